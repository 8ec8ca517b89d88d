"""The command line: ``rdsd`` (``rdsd.py``), ``rdsft`` (``rdsft.py``), what
they print (``output.py``) and the daemon process (``daemon.py``)."""
