"""The parent half, shared by the server and relays: accepting children
(``downlinks``), what each of their messages does (``handlers``), and who
must hear what (``routing``, pure)."""
