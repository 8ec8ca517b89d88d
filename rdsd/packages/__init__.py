"""Packages: signed manifests, tar packing and safe extraction, the store
of complete packages and the downloads filling it."""
