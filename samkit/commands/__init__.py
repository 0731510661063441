"""The command lines: one module per ``samkit`` subcommand, the dispatcher (:mod:`.main`) and what
they share (:mod:`.base`). The seed's scripts (``train.py``, ``demo/*.py`` ...) call these modules."""
