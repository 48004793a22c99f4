"""Runtimes behind one interface (base.Runtime): local (bubblewrap jails), later docker and kubernetes."""
