"""all-reduce -> [+ residual] -> RMSNorm, with a bf16 / fp16 / fp32 norm output."""

from fusion_passes import variants
from fusion_passes.patterns.family import Family

OP = f"fusion_passes.{variants.BY_NAME['add_rmsnorm'].op}"

FAMILIES = (
    # every attention / MLP block of a decoder layer: the sum is the next residual
    Family("allreduce_add_rmsnorm", "all_reduce -> add(residual) -> rms_norm", True, True, OP, "add_rmsnorm",
           where="end of each attention and MLP block, into the next norm"),
    # the last layer's MLP into the model's final norm: nobody reads the sum afterwards
    Family("allreduce_add_rmsnorm_final", "all_reduce -> add(residual) -> rms_norm (sum unused)", True, False,
           OP, "add_rmsnorm", where="last decoder layer into the final norm"),
    # no residual add (e.g. the vocab-parallel embedding into layer 0's norm, which also
    # keeps the reduced value as the residual: returned as the op's second output)
    Family("allreduce_rmsnorm", "all_reduce -> rms_norm", False, None, OP, "add_rmsnorm",
           where="embedding all-reduce into the first norm; blocks without residual"),
)
