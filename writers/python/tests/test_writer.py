"""The writer's own checks. Run from writers/python: python3 -m unittest -v
(crates/parity/tests/writers.rs runs them too)."""

import json
import os
import tempfile
import unittest
import zlib

import numpy as np

from qwen2_parity_dump import STAGES, Dims, DumpWriter

# Small dims, all different, so that a swapped axis shows.
DIMS = Dims(n_layer=2, n_embd=12, n_head=4, n_head_kv=2, head_dim=3, n_ff=20, n_vocab=30)
TOKENS = [5, 6, 7]


class WriterTest(unittest.TestCase):
    def setUp(self):
        self.tmp = tempfile.TemporaryDirectory()
        self.dir = os.path.join(self.tmp.name, "dump")

    def tearDown(self):
        self.tmp.cleanup()

    def writer(self, **overrides):
        args = dict(engine="test-engine", model_sha256="ab" * 32, prompt="héllo", tokens=TOKENS, dims=DIMS)
        args.update(overrides)
        return DumpWriter(self.dir, **args)

    def manifest(self):
        with open(os.path.join(self.dir, "manifest.json"), encoding="utf-8") as f:
            return json.load(f)

    def test_every_stage_of_prefill_and_one_decode_step(self):
        dump = self.writer()
        rng = np.random.default_rng(0)
        for step in (0, 1):
            for name, _, scope in STAGES:
                for layer in ([None] if scope == "global" else range(DIMS.n_layer)):
                    shape = dump.expected_shape(step, name)
                    dump.add(step, layer, name, rng.standard_normal(shape, dtype=np.float32), provenance="p")
        dump.finish(generated=[8, 9])
        m = self.manifest()
        self.assertEqual(m["format"], "qwen2-parity-capture/1")
        self.assertEqual((m["engine"], m["prompt"], m["tokens"], m["generated"]), ("test-engine", "héllo", TOKENS, [8, 9]))
        self.assertEqual(m["n_steps"], 2)
        self.assertEqual(m["config"]["layers"], [0, 1])
        self.assertEqual(m["config"]["n_decode"], 1)
        self.assertEqual(m["unavailable"], [])
        self.assertEqual(len(m["stages"]), 2 * (3 + 17 * DIMS.n_layer))
        by_id = {(e["step"], e["layer"], e["stage"]): e for e in m["stages"]}
        self.assertEqual(by_id[(0, 1, "attn_scores")]["shape"], [4, 3, 3])
        self.assertEqual(by_id[(1, 1, "attn_scores")]["shape"], [4, 1, 4])
        self.assertEqual(by_id[(1, 0, "k_rope")]["shape"], [1, 2, 3])
        self.assertEqual(by_id[(0, None, "logits")]["file"], "step0/logits.npy")
        for e in m["stages"]:
            with open(os.path.join(self.dir, e["file"]), "rb") as f:
                data = f.read()
            self.assertEqual((len(data), zlib.crc32(data)), (e["bytes"], e["crc32"]), e["file"])
            a = np.load(os.path.join(self.dir, e["file"]))
            self.assertEqual((a.dtype.str, list(a.shape)), ("<f4", e["shape"]))
        self.assertEqual(by_id[(0, 0, "q_proj")]["file"], "step0/layer00/q_proj.npy")
        # No temporary file is left behind.
        leftovers = [f for _, _, files in os.walk(self.dir) for f in files if ".tmp" in f]
        self.assertEqual(leftovers, [])

    def test_unknown_stage_is_refused(self):
        dump = self.writer()
        with self.assertRaisesRegex(ValueError, r"unknown stage 'qk_proj'.*q_proj"):
            dump.add(0, 0, "qk_proj", np.zeros((3, 12), np.float32))

    def test_wrong_shape_is_refused_with_the_canonical_one(self):
        dump = self.writer()
        # q_proj as [tokens, heads * head_dim]: the same bytes, not the layout.
        with self.assertRaisesRegex(ValueError, r"q_proj: shape \(3, 12\).*\(3, 4, 3\) \(token, head, dim\)"):
            dump.add(0, 0, "q_proj", np.zeros((3, 12), np.float32))
        with self.assertRaisesRegex(ValueError, r"\(4, 1, 4\)"):
            dump.add(1, 0, "attn_probs", np.zeros((4, 1, 3), np.float32))

    def test_layer_must_match_the_stage_scope_and_the_model(self):
        dump = self.writer()
        with self.assertRaisesRegex(ValueError, "global stage"):
            dump.add(0, 0, "embed", np.zeros((3, 12), np.float32))
        with self.assertRaisesRegex(ValueError, "per-layer stage"):
            dump.add(0, None, "attn_norm", np.zeros((3, 12), np.float32))
        with self.assertRaisesRegex(ValueError, "layer 2 is out of range"):
            dump.add(0, 2, "attn_norm", np.zeros((3, 12), np.float32))
        with self.assertRaisesRegex(ValueError, "step must be"):
            dump.add(-1, 0, "attn_norm", np.zeros((3, 12), np.float32))

    def test_a_checkpoint_is_added_once(self):
        dump = self.writer()
        dump.add(0, 0, "attn_norm", np.zeros((3, 12), np.float32))
        with self.assertRaisesRegex(ValueError, "already added"):
            dump.add(0, 0, "attn_norm", np.ones((3, 12), np.float32))

    def test_floating_types_are_converted_to_f32_and_others_refused(self):
        dump = self.writer()
        dump.add(0, None, "embed", np.full((3, 12), 0.1, np.float64))
        dump.add(0, 0, "attn_norm", np.full((3, 12), 0.5, np.float16))
        dump.add(0, 1, "attn_norm", np.full((3, 12), 2.0, ">f4"))  # big-endian
        for bad in (np.zeros((3, 12), np.int32), np.zeros((3, 12), bool), np.zeros((3, 12), np.complex64)):
            with self.assertRaisesRegex(TypeError, "floating-point tensors only"):
                dump.add(0, None, "final_norm", bad)
        dump.finish()
        a = np.load(os.path.join(self.dir, "step0/embed.npy"))
        self.assertEqual(a.dtype.str, "<f4")
        self.assertEqual(a[0, 0], np.float32(0.1))
        self.assertEqual(np.load(os.path.join(self.dir, "step0/layer01/attn_norm.npy"))[2, 11], 2.0)

    def test_nan_and_inf_are_written_as_they_are(self):
        dump = self.writer()
        x = np.zeros((3, 12), np.float32)
        x[1, 2], x[2, 3] = np.nan, np.inf
        dump.add(0, None, "embed", x)
        dump.finish()
        back = np.load(os.path.join(self.dir, "step0/embed.npy"))
        self.assertTrue(np.isnan(back[1, 2]))
        self.assertEqual(back[2, 3], np.inf)

    def test_unavailable_stages_are_listed(self):
        dump = self.writer(flash_attn=True)
        dump.add(0, 0, "attn_ctx", np.zeros((3, 4, 3), np.float32))
        dump.mark_unavailable(0, 0, "attn_scores")
        dump.finish()
        m = self.manifest()
        self.assertEqual(m["unavailable"], [{"step": 0, "layer": 0, "stage": "attn_scores"}])
        self.assertTrue(m["config"]["flash_attn"])

    def test_no_manifest_until_finish_and_an_old_one_is_removed_first(self):
        dump = self.writer()
        dump.add(0, None, "embed", np.zeros((3, 12), np.float32))
        dump.finish()
        self.assertTrue(os.path.exists(os.path.join(self.dir, "manifest.json")))
        # A second writer over the same directory, stopped before finish():
        # the old manifest must not describe its files.
        dump = self.writer()
        self.assertFalse(os.path.exists(os.path.join(self.dir, "manifest.json")))
        dump.add(0, None, "embed", np.ones((3, 12), np.float32))
        self.assertFalse(os.path.exists(os.path.join(self.dir, "manifest.json")))

    def test_finish_needs_a_tensor_and_happens_once(self):
        dump = self.writer()
        with self.assertRaisesRegex(ValueError, "nothing was added"):
            dump.finish()
        dump.add(0, None, "embed", np.zeros((3, 12), np.float32))
        dump.finish()
        with self.assertRaisesRegex(RuntimeError, "finished"):
            dump.add(0, None, "logits", np.zeros((3, 30), np.float32))

    def test_bad_arguments_are_refused(self):
        with self.assertRaisesRegex(ValueError, "64 hex digits"):
            self.writer(model_sha256="not-a-sha")
        with self.assertRaisesRegex(ValueError, "at least one"):
            self.writer(tokens=[])
        with self.assertRaisesRegex(ValueError, "token id"):
            self.writer(tokens=[1, 2.5])
        with self.assertRaisesRegex(ValueError, "Dims.n_head"):
            Dims(n_layer=2, n_embd=12, n_head=0, n_head_kv=2, head_dim=3, n_ff=20, n_vocab=30)


if __name__ == "__main__":
    unittest.main()
