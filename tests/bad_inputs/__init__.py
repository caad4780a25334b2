"""The bad-input battery: every way a user can hand loramerge something wrong (split by seam into this package).

Each case asserts the exact error class, that the message names the file or module at fault, and that it
says what to do (the ``fix`` line). Cases that should *work* (disjoint targets, rank beyond d, ``force``)
assert the result against an independent dense computation. Output failures assert the guarantee:
previous output and inputs byte-identical, no partial or temporary directory left.
"""
