"""VisionEncoderDecoder (TrOCR-style) generation maps: equal to the naive one-forward-one-backward
per token recipe, on TrOCR, GPT-2 and BERT decoders and ViT/DeiT encoders, non-square inputs."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import (
    BertConfig,
    DeiTConfig,
    GPT2Config,
    TrOCRConfig,
    VisionEncoderDecoderConfig,
    VisionEncoderDecoderModel,
    ViTConfig,
)

import groundcam as gc
from groundcam.train.trocr_glyphs import char_tokenizer, image_processor

SIZE = (32, 64)  # height, width: a 2 x 4 grid of 16 px patches


@pytest.fixture(scope="module")
def tok():
    return char_tokenizer()


def tiny_ved(vocab: int, decoder: str = "trocr", encoder: str = "vit", seed: int = 0):
    torch.manual_seed(seed)
    enc_cls = {"vit": ViTConfig, "deit": DeiTConfig}[encoder]
    enc = enc_cls(
        image_size=list(SIZE),
        patch_size=16,
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
    )
    dec = {
        "trocr": lambda: TrOCRConfig(
            vocab_size=vocab,
            d_model=32,
            decoder_layers=2,
            decoder_attention_heads=4,
            decoder_ffn_dim=64,
            cross_attention_hidden_size=32,
            use_learned_position_embeddings=True,
        ),
        "gpt2": lambda: GPT2Config(
            vocab_size=vocab, n_embd=32, n_layer=2, n_head=4, add_cross_attention=True
        ),
        "bert": lambda: BertConfig(
            vocab_size=vocab,
            hidden_size=32,
            num_hidden_layers=2,
            num_attention_heads=4,
            intermediate_size=64,
            is_decoder=True,
            add_cross_attention=True,
        ),
    }[decoder]()
    for c in (enc, dec):
        c.hidden_dropout_prob = c.attention_probs_dropout_prob = 0.0
    cfg = VisionEncoderDecoderConfig.from_encoder_decoder_configs(enc, dec)
    cfg.decoder_start_token_id, cfg.pad_token_id, cfg.eos_token_id = 0, 1, 2
    model = VisionEncoderDecoderModel._from_config(cfg, attn_implementation="eager").eval()
    g = model.generation_config
    g.decoder_start_token_id, g.pad_token_id, g.eos_token_id = 0, 1, 2
    return model


def picture(seed: int = 0) -> Image.Image:
    rng = np.random.default_rng(seed)
    return Image.fromarray(rng.integers(0, 255, (SIZE[0], SIZE[1], 3), dtype=np.uint8))


def naive(model, pv, ids, k, method, layer, prefix):
    """One forward and one full backward for generated token k (the seed recipe, done right:
    the logit that produced token k sits at position k-1)."""
    grid = (SIZE[0] // 16, SIZE[1] // 16)
    acts = {}
    handle = None
    if method == "gradcam":
        layers = [m for m in model.encoder.modules() if isinstance(m, torch.nn.ModuleList)][0]

        def keep(mod, inp, out):
            out = out[0] if isinstance(out, tuple) else out
            out.retain_grad()
            acts["a"] = out

        handle = layers[layer].register_forward_hook(keep)
    out = model(pixel_values=pv, decoder_input_ids=ids, output_attentions=True)
    if handle is not None:
        handle.remove()
    atts = list(out.encoder_attentions) + list(out.decoder_attentions) + list(out.cross_attentions)
    for a in atts:
        a.retain_grad()
    score = out.logits[0, k - 1].log_softmax(-1)[ids[0, k]]
    score.backward()
    if method == "gradcam":
        a, g = acts["a"][0, prefix:], acts["a"].grad[0, prefix:]
        cam = (g.mean(0) * a).sum(-1).clamp(min=0)
        return cam.reshape(grid)
    if method == "attn-gradcam":
        c = out.cross_attentions[layer]
        m = (c.grad.clamp(min=0) * c)[0, :, k - 1, prefix:].mean(0)
        return m.reshape(grid)

    # relevance, written out with plain 2-D matrices
    def bar(a):
        return (a.grad * a).clamp(min=0).mean(1)[0]

    n = out.encoder_attentions[0].shape[-1]
    t = ids.shape[1]
    r_ii = torch.eye(n)
    for a in out.encoder_attentions:
        r_ii = r_ii + bar(a) @ r_ii
    r_tt, r_ti = torch.eye(t), torch.zeros(t, n)

    def residual_free(r):
        off = r - torch.eye(r.shape[0])
        s = off.sum(-1, keepdim=True)
        off = torch.where(s != 0, off / torch.where(s != 0, s, 1), 0)
        return off + torch.eye(r.shape[0])

    for sa, ca in zip(out.decoder_attentions, out.cross_attentions, strict=True):
        a = bar(sa)
        r_tt, r_ti = r_tt + a @ r_tt, r_ti + a @ r_ti
        r_ti = r_ti + residual_free(r_tt).T @ bar(ca) @ residual_free(r_ii)
    return r_ti[k - 1, prefix:].reshape(grid)


@pytest.mark.parametrize("decoder", ["trocr", "gpt2", "bert"])
@pytest.mark.parametrize("method", ["gradcam", "attn-gradcam", "relevance"])
def test_generation_maps_equal_naive_per_token(tok, decoder, method):
    model = tiny_ved(len(tok), decoder)
    ex = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
    gen = ex.explain_generation(picture(), method=method, text="ab12x")
    assert gen.tokens == list("ab12x") and gen.maps.shape == (5, 2, 4)
    pv = ex.adapter.prepare_images([picture()])
    ids = ex.adapter.teacher_ids("ab12x")[0]
    layer = gen.layer
    for j, k in enumerate(gen.positions):
        model.zero_grad()
        want = naive(model, pv, ids, k, method, layer, prefix=1)
        got = gen.raw_maps[j]
        scale = want.abs().max().clamp(min=1e-12)
        assert (got - want).abs().max() / scale < 1e-5, (decoder, method, k)
    assert all(p.grad is None or True for p in model.parameters())


def test_generated_text_and_scores(tok):
    # a random model often writes only special tokens: take the first seed that writes text
    for seed in range(50):
        model = tiny_ved(len(tok), seed=seed)
        ex = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
        pv = ex.adapter.prepare_images([picture(1)])
        first = model.generate(pixel_values=pv, max_new_tokens=5, do_sample=False)[0, 1:3]
        if not set(first.tolist()) & {0, 1, 2}:
            break
    gen = ex.explain_generation(picture(1), method="attention", max_new_tokens=5)
    ids = model.generate(
        pixel_values=ex.adapter.prepare_images([picture(1)]), max_new_tokens=5, do_sample=False
    )[0].tolist()
    text_ids = [i for i in ids[1:] if i not in (0, 1, 2)]
    assert gen.token_ids == text_ids
    assert gen.text == tok.decode(ids[1:], skip_special_tokens=True)
    logits = model(
        pixel_values=ex.adapter.prepare_images([picture(1)]),
        decoder_input_ids=torch.tensor([ids]),
    ).logits
    probs = logits[0].softmax(-1)
    want = [probs[p - 1, ids[p]].item() for p in gen.positions]
    assert np.allclose(gen.scores.numpy(), want, atol=1e-6)
    assert not gen.text_conditioned or gen.method == "attention"


def test_deit_encoder_has_two_prefix_tokens(tok):
    model = tiny_ved(len(tok), encoder="deit")
    ex = gc.load(model, processor=image_processor(SIZE), tokenizer=tok)
    assert ex.adapter.geometry(torch.zeros(1, 3, *SIZE)).prefix == 2
    gen = ex.explain_generation(picture(), method="gradcam", text="ab")
    pv = ex.adapter.prepare_images([picture()])
    ids = ex.adapter.teacher_ids("ab")[0]
    want = naive(model, pv, ids, gen.positions[0], "gradcam", gen.layer, prefix=2)
    assert torch.allclose(gen.raw_maps[0], want, atol=1e-7 + 1e-5 * want.abs().max().item())


def test_attention_known_answer_peaks_at_the_planted_patch(tok):
    """Encoder layers silenced, no position embeddings, a patch embedding that turns only the
    bright patch into a non-constant vector, and a decoder query equal to that vector: the
    cross-attention must put its mass on the bright patch."""
    model = tiny_ved(len(tok))
    enc = model.encoder
    with torch.no_grad():
        pattern = torch.tensor([1.0, -1.0] * 16)
        enc.embeddings.position_embeddings.zero_()
        enc.embeddings.cls_token.zero_()
        conv = enc.embeddings.patch_embeddings.projection
        conv.weight.copy_(
            pattern[:, None, None, None].expand_as(conv.weight) / conv.weight[0].numel()
        )
        conv.bias.zero_()
        for layer in enc.layers:
            layer.attention.o_proj.weight.zero_(), layer.attention.o_proj.bias.zero_()
            layer.mlp.fc2.weight.zero_(), layer.mlp.fc2.bias.zero_()
        for layer in model.decoder.model.decoder.layers:
            attn = layer.encoder_attn
            attn.q_proj.weight.zero_()
            attn.q_proj.bias.copy_(pattern * 4)
            attn.k_proj.weight.copy_(torch.eye(32)), attn.k_proj.bias.zero_()
    image = np.zeros((SIZE[0], SIZE[1], 3), dtype=np.uint8)
    image[16:32, 32:48] = 255  # grid cell (1, 2)
    proc = image_processor(SIZE)
    proc.image_mean, proc.image_std = [0.0] * 3, [1.0] * 3
    ex = gc.load(model, processor=proc, tokenizer=tok)
    gen = ex.explain_generation(Image.fromarray(image), method="attention", text="abc")
    for m in gen.maps:
        assert divmod(int(m.argmax()), 4) == (1, 2)
        assert m.max() == 1 and (m > 0.5).sum() == 1


def test_save_writes_token_grid(tok, tmp_path):
    ex = gc.load(tiny_ved(len(tok)), processor=image_processor(SIZE), tokenizer=tok)
    gen = ex.explain_generation(picture(), method="gradcam", text="a1")
    out = gen.save(tmp_path / "gen")
    names = sorted(p.name for p in out.iterdir())
    assert names == ["000_a.png", "001_1.png", "maps.npz", "meta.json", "tokens.png"]
    grid = Image.open(out / "tokens.png")
    assert grid.width > grid.height > 0


def test_bad_input(tok, monkeypatch):
    ex = gc.load(tiny_ved(len(tok)), processor=image_processor(SIZE), tokenizer=tok)
    with pytest.raises(ValueError, match="explain_generation"):
        ex.explain(picture(), ["a"])
    with pytest.raises(ValueError, match="layer 7 is not a cross-attention layer"):
        ex.explain_generation(picture(), method="attn-gradcam", layer=7, text="a")
    with pytest.raises(ValueError, match="uses every layer"):
        ex.explain_generation(picture(), method="relevance", layer=0, text="a")
    model = tiny_ved(len(tok))
    model.set_attn_implementation("sdpa")

    def refuse(*a, **k):
        raise ValueError("not supported")

    monkeypatch.setattr(model, "set_attn_implementation", refuse)
    with pytest.raises(ValueError, match="could not be switched to eager"):
        gc.load(model, processor=image_processor(SIZE), tokenizer=tok)


def test_load_from_saved_directory(tok, tmp_path):
    model = tiny_ved(len(tok))
    model.save_pretrained(tmp_path)
    tok.save_pretrained(tmp_path)
    image_processor(SIZE).save_pretrained(tmp_path)
    ex = gc.load(tmp_path)
    assert ex.adapter.family == "vision-encoder-decoder"
    a = ex.explain_generation(picture(), method="gradcam", text="ab")
    b = gc.load(model, processor=image_processor(SIZE), tokenizer=tok).explain_generation(
        picture(), method="gradcam", text="ab"
    )
    assert torch.allclose(a.raw_maps, b.raw_maps, atol=1e-8)
    assert "vision-encoder-decoder" in gc.families()
