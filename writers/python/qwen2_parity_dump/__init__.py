"""Write an engine's intermediate tensors as a qwen2-parity dump, for
``parity diff`` to compare with llama.cpp's capture stage by stage.

    from qwen2_parity_dump import Dims, DumpWriter
    dump = DumpWriter("dumps/mine", engine="my-engine", model_sha256=sha, prompt=p, tokens=ids,
                      dims=Dims(n_layer=24, n_embd=896, n_head=14, n_head_kv=2, head_dim=64, n_ff=4864, n_vocab=151936))
    dump.add(0, 0, "q_proj", q)      # step 0 (prefill), layer 0, [tokens, heads, head_dim]
    dump.finish()
"""

from .stages import STAGES, Dims, canonical_shape
from .writer import FORMAT, DumpWriter

__all__ = ["Dims", "DumpWriter", "FORMAT", "STAGES", "canonical_shape"]
