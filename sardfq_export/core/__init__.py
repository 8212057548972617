"""Below everything: error types, the calibration-set format, atomic file IO, distributed helpers.

Imports nothing else of sardfq-export (the layering test checks it), so every stage may use it.
"""
