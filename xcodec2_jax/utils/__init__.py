"""The bottom layer: small helpers that every other layer may use and that import nothing above them.

``tree`` (nested dicts <-> flat path dicts), ``files`` (atomic writes, the directory walk, the audio
suffixes), ``dtypes`` (the dtype-name map), ``validation`` (every check of user input),
``progress`` (progress bars) and ``compat`` (one wrapper per private API of a dependency).
"""
