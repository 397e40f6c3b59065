"""The spelling corpus: real RMSNorm / residual-add / activation-quant spellings.

:mod:`.sources` transcribes each project's code as a small function; :mod:`.design`,
:mod:`.held_out` and :mod:`.negative` combine them into all-reduce chains (``Case``);
:mod:`.harness` traces, fuses and compares them, on the fake process group (one process)
and on two gloo ranks; :mod:`.standins` registers CPU stand-ins for in-place kernel ops that
do not exist on this machine.
"""
