"""Write an engine's tensors as a qwen2-parity dump.

The format is what ``read_dump`` in crates/capture/src/dump.rs reads: one
``.npy`` (format 1.0, ``<f4``, C order) per checkpoint at
``step{S}/layer{LL}/{stage}.npy`` or ``step{S}/{stage}.npy``, and
``manifest.json`` listing each file with its size and CRC-32.

As on the Rust side, nothing half-written is ever read as a dump: opening a
writer removes an old manifest from the directory before any file is
written, each file is written under a temporary name and renamed, and the
manifest is written last, the same way. A program that stops before
``finish()`` leaves a directory that ``parity diff`` refuses.
"""

import io
import itertools
import json
import os
import re
import zlib

import numpy as np

from .stages import AXES, IS_GLOBAL, LAYOUT, Dims, canonical_shape

FORMAT = "qwen2-parity-capture/1"

_temporary_names = itertools.count()


def _write_atomically(path, data):
    """Write `data` to `path` through a temporary name beside it."""
    tmp = f"{path}.tmp{os.getpid()}-{next(_temporary_names)}"
    try:
        with open(tmp, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def _index(value, what):
    """`value` as a non-negative int; bools and floats are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 0:
        raise ValueError(f"{what} must be a non-negative integer, got {value!r}")
    return int(value)


def _token_ids(values, what):
    """Token ids as ints that fit the manifest's i32."""
    ids = [_index(t, f"a token id in {what}") for t in values]
    if any(t >= 2**31 for t in ids):
        raise ValueError(f"{what}: token ids must fit in 32 bits")
    return ids


class DumpWriter:
    """A dump being written to `directory` (created if missing).

    `tokens` are the prompt's token ids (the prefill, step 0). Decode step
    k > 0 feeds one token, so its tensors have 1 token row and attention
    over len(tokens) + k cache positions: ``add`` checks every shape
    against that. `model_sha256` is the GGUF file's sha256 in hex ("" when
    not known: the diff then cannot check both dumps ran the same model).
    `kv_type` ("f16", "f32", ...) and `threads` are recorded for the
    reports; "" and 0 mean not recorded.
    """

    def __init__(self, directory, *, engine, model_sha256, prompt, tokens, dims,
                 chat=False, kv_type="", flash_attn=False, threads=0):
        if not isinstance(dims, Dims):
            raise TypeError(f"dims must be a qwen2_parity_dump.Dims, got {type(dims).__name__}")
        if not isinstance(engine, str) or not engine:
            raise ValueError("engine must be a non-empty name, e.g. 'my-engine-cuda'")
        if not isinstance(model_sha256, str) or not re.fullmatch(r"([0-9a-fA-F]{64})?", model_sha256):
            raise ValueError(f"model_sha256 must be 64 hex digits (or '' when not known), got {model_sha256!r}")
        if not isinstance(prompt, str):
            raise TypeError("prompt must be a str")
        prompt.encode("utf-8")  # a lone surrogate would make a manifest the reader refuses
        self.tokens = _token_ids(tokens, "tokens")
        if not self.tokens:
            raise ValueError("tokens must hold the prompt's token ids (at least one)")
        self.directory = os.fspath(directory)
        self.engine = engine
        self.model_sha256 = model_sha256.lower()
        self.prompt = prompt
        self.chat = bool(chat)
        self.dims = dims
        self.kv_type = str(kv_type)
        self.flash_attn = bool(flash_attn)
        self.threads = _index(threads, "threads")
        self._stages = {}  # (step, layer, stage) -> manifest entry
        self._unavailable = set()  # (step, layer, stage)
        self._finished = False
        # The directory stops being a dump before any of its files change.
        os.makedirs(self.directory, exist_ok=True)
        manifest = os.path.join(self.directory, "manifest.json")
        if os.path.exists(manifest):
            os.remove(manifest)

    def _checkpoint(self, step, layer, stage):
        """Check one (step, layer, stage) against the catalogue and the model."""
        if self._finished:
            raise RuntimeError("the dump is finished: open a new DumpWriter")
        if stage not in LAYOUT:
            raise ValueError(f"unknown stage {stage!r}: the catalogue's stages are {', '.join(LAYOUT)}")
        step = _index(step, "step")
        if IS_GLOBAL[stage]:
            if layer is not None:
                raise ValueError(f"{stage} is a global stage: pass layer None, not {layer!r}")
        else:
            if layer is None:
                raise ValueError(f"{stage} is a per-layer stage: pass its layer")
            layer = _index(layer, "layer")
            if layer >= self.dims.n_layer:
                raise ValueError(f"layer {layer} is out of range: the model has {self.dims.n_layer} layers")
        key = (step, layer, stage)
        if key in self._stages or key in self._unavailable:
            raise ValueError(f"step {step}, layer {layer}, {stage} was already added")
        return key

    def expected_shape(self, step, stage):
        """The canonical shape of `stage` at `step`."""
        n_prompt = len(self.tokens)
        n_tokens = n_prompt if step == 0 else 1
        return canonical_shape(stage, self.dims, n_tokens, n_prompt + step)

    def add(self, step, layer, stage, array, provenance=""):
        """Write one checkpoint: `step` 0 is the prefill, k the k-th decode
        step; `layer` is None for the global stages (embed, final_norm,
        logits). `array` must have the stage's canonical shape exactly (see
        ``expected_shape``). Any floating dtype is converted to little-endian
        f32 (the format's only type); integer, bool and complex arrays are
        refused. NaN and Inf are written as they are: the diff fails them.
        """
        step, layer, stage = self._checkpoint(step, layer, stage)
        array = np.asarray(array)
        if not np.issubdtype(array.dtype, np.floating):
            raise TypeError(f"{stage}: a {array.dtype} array; the dump holds floating-point tensors only")
        expected = self.expected_shape(step, stage)
        if array.shape != expected:
            axes = ", ".join(AXES[LAYOUT[stage]])
            raise ValueError(
                f"step {step}, layer {layer}, {stage}: shape {array.shape}, the catalogue's layout is "
                f"{expected} ({axes}) for {len(self.tokens)} prompt tokens: reshape or transpose to it"
            )
        array = np.ascontiguousarray(array, dtype="<f4")
        file = f"step{step}/{stage}.npy" if layer is None else f"step{step}/layer{layer:02d}/{stage}.npy"
        buffer = io.BytesIO()
        np.lib.format.write_array(buffer, array, version=(1, 0), allow_pickle=False)
        data = buffer.getvalue()
        path = os.path.join(self.directory, file)
        os.makedirs(os.path.dirname(path), exist_ok=True)
        _write_atomically(path, data)
        self._stages[(step, layer, stage)] = {
            "step": step,
            "layer": layer,
            "stage": stage,
            "shape": list(expected),
            "file": file,
            "provenance": str(provenance),
            "bytes": len(data),
            "crc32": zlib.crc32(data),
        }

    def mark_unavailable(self, step, layer, stage):
        """Record a checkpoint this engine cannot observe (attention scores
        and probabilities under flash attention): reported, never zeros."""
        self._unavailable.add(self._checkpoint(step, layer, stage))

    def finish(self, generated=()):
        """Write the manifest, last. `generated`: the token each step picked
        (greedy), one per step, when known. Returns the manifest's path."""
        if self._finished:
            raise RuntimeError("the dump is already finished")
        if not self._stages:
            raise ValueError("nothing was added: a dump needs at least one tensor")
        n_steps = 1 + max(step for step, _, _ in itertools.chain(self._stages, self._unavailable))
        layers = sorted({layer for _, layer, _ in self._stages if layer is not None})
        d = self.dims
        manifest = {
            "format": FORMAT,
            "engine": self.engine,
            "model_sha256": self.model_sha256,
            "prompt": self.prompt,
            "chat": self.chat,
            "tokens": self.tokens,
            "generated": _token_ids(generated, "generated"),
            "n_steps": n_steps,
            "config": {
                "kv_type": self.kv_type,
                "flash_attn": self.flash_attn,
                "n_layer": d.n_layer,
                "n_embd": d.n_embd,
                "n_head": d.n_head,
                "n_head_kv": d.n_head_kv,
                "head_dim": d.head_dim,
                "n_ff": d.n_ff,
                "n_vocab": d.n_vocab,
                "layers": layers,
                "n_decode": n_steps - 1,
                "threads": self.threads,
            },
            "stages": [self._stages[k] for k in sorted(self._stages, key=_sort_key)],
            "unavailable": [
                {"step": s, "layer": l, "stage": n} for s, l, n in sorted(self._unavailable, key=_sort_key)
            ],
        }
        path = os.path.join(self.directory, "manifest.json")
        _write_atomically(path, json.dumps(manifest, indent=1).encode("utf-8"))
        self._finished = True
        return path


def _sort_key(key):
    """(step, layer, stage) in a stable order for the manifest (globals first)."""
    step, layer, stage = key
    return (step, -1 if layer is None else layer, stage)
