"""The decoder model on its own: architecture variants, masks, cross-document isolation, HF export."""

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoModelForCausalLM

from lmfleet.model import ModelConfig, Transformer
from lmfleet.model.export import export_model, load_model
from lmfleet.model.transformer import FlexMask, alibi_slopes, attention_mask, flex_mask, rope_cos_sin

BASE = dict(vocab_size=64, n_layers=2, d_model=32, n_heads=4, max_seq_len=32)
VARIANTS = {
    "llama_gqa": dict(n_kv_heads=2),
    "mqa": dict(n_kv_heads=1),
    "alibi_layernorm_gelu": dict(positions="alibi", norm="layernorm", activation="gelu"),
    "learned_relu_postln": dict(positions="learned", activation="relu", norm_placement="post"),
    "sliding_window": dict(attention=["local", "global"], sliding_window=4),
    "tied_dropout": dict(tie_embeddings=True, dropout=0.1),
}


@pytest.mark.parametrize("name", list(VARIANTS))
def test_variant_trains(name):
    torch.manual_seed(0)
    cfg = ModelConfig(**BASE, **VARIANTS[name])
    model = Transformer(cfg)
    if cfg.kv_heads < cfg.n_heads:
        assert model.layers["0"].attention.wk.out_features == cfg.kv_heads * cfg.dim_per_head
    # A learnable pattern: each sequence repeats a random 4-token motif.
    data = torch.randint(0, 64, (16, 4)).repeat(1, 5)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    losses = []
    for _ in range(30):
        logits = model(data[:, :-1])
        assert logits.shape == (16, 19, 64)
        loss = F.cross_entropy(logits.reshape(-1, 64), data[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < 0.5 * losses[0], losses


def test_masks_causal_segment_and_window():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    m = attention_mask(positions, window=None)[0, 0]
    assert m.shape == (8, 8)
    assert not m[1, 2]  # causal
    assert m[2, 0] and not m[3, 2] and m[6, 3] and not m[7, 6]  # within a document only
    w = attention_mask(torch.arange(8)[None], window=3)[0, 0]
    assert w[5, 3] and not w[5, 2] and w[5, 5]


def test_encoder_masks_see_both_ways_within_a_document():
    positions = torch.tensor([[0, 1, 2, 0, 1, 2, 3, 0]])
    m = attention_mask(positions, window=None, causal=False)[0, 0]
    assert m[0, 2] and m[2, 0] and m[3, 6] and not m[2, 3] and not m[7, 6] and m[7, 7]
    w = attention_mask(torch.arange(8)[None], window=3, causal=False)[0, 0]
    assert w[3, 5] and w[5, 3] and not w[5, 2] and not w[2, 5]


@pytest.mark.parametrize("variant", ["llama_gqa", "alibi_layernorm_gelu", "sliding_window"])
def test_an_encoder_reads_the_whole_document_and_no_other(variant):
    """causal: false: the first token's output changes with a later token of its document, never with another
    document's; one document per row (no mask: SDPA without is_causal) equals the dense mask; flex equals sdpa."""
    cfg = ModelConfig(**BASE, **VARIANTS[variant], causal=False)
    model = Transformer(cfg, seed=2).eval()
    tokens, positions = _packed_batch()
    changed = tokens.clone()
    changed[0, 4] = (changed[0, 4] + 1) % 64  # the last token of row 0's first document
    changed[0, 7] = (changed[0, 7] + 1) % 64  # and one of its second
    with torch.no_grad():
        out, out2 = model(tokens, positions), model(changed, positions)
        assert not torch.allclose(out[0, 0], out2[0, 0], atol=1e-4)  # sees the later token of its document
        torch.testing.assert_close(out[0, 8:], out2[0, 8:], atol=1e-6, rtol=1e-6)  # documents after: untouched
        if variant == "llama_gqa":  # one document per row: no mask at all, and no is_causal either
            one = torch.arange(12)[None].repeat(2, 1)
            assert model.masks(one) == {"global": None}
            h, rope = model.tok_embeddings(tokens[:, :12]), rope_cos_sin(one, cfg.dim_per_head, cfg.rope_theta)
            dense = {"global": attention_mask(one, None, causal=False)}
            block = model.layers["0"]
            torch.testing.assert_close(block(h, {"global": None}, rope), block(h, dense, rope), atol=1e-5, rtol=1e-5)
        flex = Transformer(cfg.model_copy(update={"attention_impl": "flex"}), seed=2).eval()
        torch.testing.assert_close(flex(tokens, positions), out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("variant", ["llama_gqa", "alibi_layernorm_gelu", "learned_relu_postln", "sliding_window"])
def test_packed_documents_do_not_see_each_other(variant):
    """Logits of a document packed after another equal its logits alone (positions reset at 0)."""
    torch.manual_seed(0)
    model = Transformer(ModelConfig(**BASE, **VARIANTS[variant])).eval()
    a, b = torch.randint(0, 64, (1, 7)), torch.randint(0, 64, (1, 9))
    packed = torch.cat([a, b], dim=1)
    positions = torch.cat([torch.arange(7), torch.arange(9)])[None]
    with torch.no_grad():
        together = model(packed, positions)
        alone_a, alone_b = model(a), model(b)
    torch.testing.assert_close(together[:, :7], alone_a, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(together[:, 7:], alone_b, atol=1e-5, rtol=1e-5)
    # Without the positions the second document would see the first: the guarantee is real.
    with torch.no_grad():
        unmasked = model(packed)
    assert not torch.allclose(unmasked[:, 7:], alone_b, atol=1e-3)


def _packed_batch():
    """Two rows of packed documents (several per row, one row starting inside a document)."""
    positions = torch.tensor([[0, 1, 2, 3, 4, 0, 1, 2, 0, 1, 2, 3, 4, 5, 6, 7, 0, 1, 2, 3],
                              [5, 6, 7, 8, 9, 10, 11, 0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12]])
    return torch.randint(0, 64, positions.shape, generator=torch.Generator().manual_seed(1)), positions


@pytest.mark.parametrize("variant", ["llama_gqa", "mqa", "alibi_layernorm_gelu", "sliding_window"])
def test_flex_attention_matches_sdpa(variant):
    """FlexAttention block masks (documents, causal, sliding window; ALiBi as a score modification) give
    the logits of SDPA's dense masks, fp32 on CPU."""
    cfg = ModelConfig(**BASE, **VARIANTS[variant])
    tokens, positions = _packed_batch()
    sdpa = Transformer(cfg, seed=3)
    flex = Transformer(cfg.model_copy(update={"attention_impl": "flex"}), seed=3)
    with torch.no_grad():
        assert all(isinstance(m, FlexMask) for m in flex.masks(positions).values())
        torch.testing.assert_close(flex(tokens, positions), sdpa(tokens, positions), atol=1e-5, rtol=1e-5)
    # Training on CPU, where torch has no FlexAttention backward, takes SDPA with the same masks.
    with pytest.warns(UserWarning, match="no FlexAttention backward on CPU"):
        assert not any(isinstance(m, FlexMask) for m in flex.masks(positions).values())


@pytest.mark.parametrize("window, alibi", [(None, False), (3, False), (None, True), (5, True)])
def test_flex_mask_gradients_match_sdpa(window, alibi):
    """Outputs and gradients of attention under our FlexAttention masks equal SDPA's with the dense
    mask. torch 2.13 refuses FlexAttention's backward on CPU in its public function, so this runs its
    reference implementation (the flex_attention operator the public function wraps) directly."""
    from torch._higher_order_ops.flex_attention import flex_attention as flex_op

    _, positions = _packed_batch()
    g = torch.Generator().manual_seed(4)
    q, k, v = (torch.randn(2, 4, positions.shape[1], 8, generator=g, requires_grad=True) for _ in range(3))
    slopes = alibi_slopes(4) if alibi else None
    mask = flex_mask(positions, window, slopes)
    out, *_ = flex_op(q, k, v, mask.score_mod or (lambda score, b, h, i, j: score), mask.block_mask.as_tuple(),
                      8**-0.5, {})
    grads = torch.autograd.grad(out.pow(2).sum(), (q, k, v))
    dense = attention_mask(positions, window)
    if alibi:
        i = torch.arange(positions.shape[1])
        bias = -slopes[:, None, None] * (i[:, None] - i[None, :]).clamp(min=0).float()
        dense = torch.where(dense, bias[None], torch.tensor(float("-inf")))
    want = F.scaled_dot_product_attention(q, k, v, attn_mask=dense)
    want_grads = torch.autograd.grad(want.pow(2).sum(), (q, k, v))
    torch.testing.assert_close(out, want, atol=1e-5, rtol=1e-5)
    for got, expected in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(got, expected, atol=1e-5, rtol=1e-4)


def test_one_document_per_row_takes_the_causal_path_without_a_mask():
    cfg = ModelConfig(**BASE, n_kv_heads=2, attention=["local", "global"], sliding_window=4)
    model = Transformer(cfg)
    single = torch.stack([torch.arange(12), torch.arange(30, 42)])  # one document each (the second continues one)
    masks = model.masks(single)
    assert masks["global"] is None and masks["local"] is not None  # a window still needs its mask
    assert model.masks(_packed_batch()[1])["global"] is not None
    # SDPA's is_causal path equals the dense causal mask it replaces
    attention = model.layers["1"].attention
    x = torch.randn(2, 12, 32, generator=torch.Generator().manual_seed(2))
    rope = rope_cos_sin(single, cfg.dim_per_head, cfg.rope_theta)
    with torch.no_grad():
        torch.testing.assert_close(attention(x, None, rope), attention(x, attention_mask(single, None), rope),
                                   atol=1e-6, rtol=1e-5)


@pytest.mark.parametrize("tie", [False, True])
def test_hf_llama_export_identical_logits(tmp_path, tie):
    torch.manual_seed(0)
    cfg = ModelConfig(**BASE, n_kv_heads=2, tie_embeddings=tie, rope_theta=5000.0)
    model = Transformer(cfg).eval()
    assert export_model(model.state_dict(), cfg, tmp_path) == "hf_llama"
    hf = AutoModelForCausalLM.from_pretrained(str(tmp_path)).eval()
    x = torch.randint(0, 64, (2, 20))
    with torch.no_grad():
        ours, theirs, reloaded = model(x), hf(x).logits, load_model(tmp_path).eval()(x)
    torch.testing.assert_close(theirs, ours, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(reloaded, ours, atol=0, rtol=0)


@pytest.mark.parametrize("variant", ["alibi_layernorm_gelu", "encoder"])
def test_own_format_for_non_llama_configs(tmp_path, variant):
    """Configs HF Llama cannot express, encoders (causal: false) among them, export in lmfleet's format."""
    cfg = ModelConfig(**BASE, **VARIANTS["alibi_layernorm_gelu"]) if variant != "encoder" else ModelConfig(
        **BASE, causal=False, tie_embeddings=True)
    model = Transformer(cfg).eval()
    assert export_model(model.state_dict(), cfg, tmp_path) == "lmfleet"
    x = torch.randint(0, 64, (2, 10))
    with torch.no_grad():
        torch.testing.assert_close(load_model(tmp_path).eval()(x), model(x), atol=0, rtol=0)


def test_invalid_shapes_rejected():
    with pytest.raises(ValueError, match="no attention dropout"):
        ModelConfig(**BASE, attention_impl="flex", dropout=0.1)
    with pytest.raises(ValueError, match="not a multiple of n_kv_heads"):
        ModelConfig(**BASE, n_kv_heads=3)
    with pytest.raises(ValueError, match="set sliding_window"):
        ModelConfig(**BASE, attention=["local"])
