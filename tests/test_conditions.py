"""One conditioning interface: a new condition goes through the table, its embedder and its reader field, with
DCA dropout in training and its own guidance scale, without touching the U-Net's forward signature."""

import contextlib
import inspect

import pytest
import torch

from model import conditions
from model.config import ConditionConfig, load_config
from model.diffusion import Diffusion
from model.guidance import guided_model_fn
from model.objectives import t2i_loss
from model.text2earth import Text2Earth
from model.unet import UNet


def toy_model():
    """configs/tiny.py plus a toy scalar condition, embedded like the level (sinusoid + MLP), dropped half the time."""
    cfg = load_config("configs/tiny.py").model
    cfg.unet.scalar_conditions = ("level", "toy")
    cfg.conditions["toy"] = ConditionConfig(field="toy", null=0.0, p_drop=0.5)
    torch.manual_seed(0)
    return Text2Earth(cfg)


def test_the_level_and_a_toy_condition_take_the_same_path():
    model = toy_model()
    assert list(inspect.signature(UNet.forward).parameters) == [
        "self",
        "x",
        "t",
        "cond",
        "down_residuals",
        "mid_residual",
    ]
    assert set(model.unet.cond_embed) == {"level", "toy"} and not hasattr(model.unet, "level_embed")
    assert model.cfg.condition_names() == ("text", "level", "toy")
    x, ctx = torch.randn(2, 4, 8, 8), torch.randn(2, 77, 64)
    with torch.no_grad():
        base = model.unet(x, 10, {"text": ctx, "level": 12.0, "toy": 0.0})
        assert not torch.equal(base, model.unet(x, 10, {"text": ctx, "level": 12.0, "toy": 3.0}))
        assert not torch.equal(base, model.unet(x, 10, {"text": ctx, "level": 15.0, "toy": 0.0}))


def test_dca_drops_each_condition_independently_and_per_global_batch():
    cfg = toy_model().cfg
    n = 4000
    raw = {
        "text": [f"caption {i}" for i in range(n)],
        "level": torch.full((n,), 15.0),
        "toy": torch.full((n,), 2.0),
    }
    out = conditions.drop(cfg, raw, torch.Generator().manual_seed(0), torch.arange(n), n)
    text = torch.tensor([c == "" for c in out["text"]])
    level, toy = out["level"] == 0, out["toy"] == 0
    assert abs(text.float().mean() - 0.1) < 0.02 and abs(level.float().mean() - 0.1) < 0.02
    assert abs(toy.float().mean() - 0.5) < 0.03
    assert abs((level & toy).float().mean() - 0.05) < 0.015  # independent: 0.1 * 0.5
    # one process with the whole batch draws what two processes with half of it each draw
    halves = [
        conditions.drop(
            cfg,
            {k: v[r::2] for k, v in raw.items()},
            torch.Generator().manual_seed(0),
            torch.arange(n // 2) * 2 + r,
            n,
        )
        for r in (0, 1)
    ]
    assert torch.equal(torch.stack([halves[0]["toy"], halves[1]["toy"]], 1).flatten(), out["toy"])


def test_a_toy_condition_trains_one_step_with_its_dropout():
    """A batch carrying the toy field trains through t2i_loss: its embedder gets gradients and moves."""
    model = toy_model()
    model.unet.train()
    batch = {
        "caption": ["a river", "a lake", "dense houses", "a desert"],
        "level": torch.tensor([12.0, 14, 16, 18]),
        "toy": torch.tensor([1.0, 2, 3, 4]),
        "image": torch.rand(4, 3, 16, 16) * 2 - 1,
    }
    before = model.unet.cond_embed["toy"].fc2.weight.detach().clone()
    opt = torch.optim.AdamW(model.unet.parameters(), lr=1e-3)
    loss, stats = t2i_loss(
        model,
        model.unet,
        batch,
        diffusion=Diffusion(),
        generator=torch.Generator().manual_seed(1),
        idx=torch.arange(4),
        global_batch=4,
        autocast=contextlib.nullcontext(),
    )
    loss.backward()
    assert model.unet.cond_embed["toy"].fc1.weight.grad.abs().max() > 0
    opt.step()
    assert not torch.equal(model.unet.cond_embed["toy"].fc2.weight, before) and stats["mse"] > 0


def test_guidance_takes_a_scale_per_condition():
    """Three groups (text, level, toy): null + s_text (b1 - null) + s_level (b2 - b1) + s_toy (b3 - b2) in one pass
    of 4B; equal consecutive scales merge into one group; all scales 1 is one conditional pass."""
    model = toy_model().eval()
    calls = []

    def denoiser(x, t, cond):
        calls.append(x.shape[0])
        return model.unet(x, t, cond)

    x, t = torch.randn(2, 4, 8, 8), torch.full((2,), 300)
    cond = {
        "text": torch.randn(2, 77, 64),
        "level": torch.tensor([12.0, 17.0]),
        "toy": torch.tensor([1.0, 3.0]),
    }
    null = {"text": torch.randn(1, 77, 64), "level": 0.0, "toy": 0.0}
    n = conditions.expand(null, 2)
    with torch.no_grad():
        b0 = model.unet(x, t, n)
        b1 = model.unet(x, t, {**n, "text": cond["text"]})
        b2 = model.unet(x, t, {**cond, "toy": n["toy"]})
        b3 = model.unet(x, t, cond)
        out = guided_model_fn(denoiser, cond, null, {"text": 3.0, "level": 6.0, "toy": 2.0})(x, t)
        assert calls == [8]
        torch.testing.assert_close(
            out, b0 + 3 * (b1 - b0) + 6 * (b2 - b1) + 2 * (b3 - b2), atol=1e-5, rtol=1e-5
        )
        calls.clear()
        joint = guided_model_fn(denoiser, cond, null, {"text": 4.0, "level": 4.0, "toy": 4.0})(x, t)
        assert calls == [4]
        torch.testing.assert_close(joint, b0 + 4 * (b3 - b0), atol=1e-5, rtol=1e-5)
        calls.clear()
        assert torch.equal(
            guided_model_fn(denoiser, cond, null, {"text": 1.0, "level": 1.0})(x, t), b3
        )
        assert calls == [2]


def test_a_reader_field_reaches_the_conditions():
    """collate batches any numeric field the samples carry; conditions.from_batch reads each condition's field."""
    from data.samples import collate

    samples = [
        {
            "caption": c,
            "key": str(i),
            "level": 12.0 + i,
            "quality": float("nan"),
            "toy": i * 0.5,
            "image": torch.zeros(3, 8, 8),
        }
        for i, c in enumerate(["a river", "a lake"])
    ]
    batch = collate(samples)
    raw = conditions.from_batch(toy_model().cfg, batch)
    assert raw["text"] == ["a river", "a lake"] and torch.equal(
        raw["toy"], torch.tensor([0.0, 0.5])
    )
    del batch["toy"]  # no sample has it: each gets the condition's null, and a warning says so
    with pytest.warns(UserWarning, match="condition toy reads the field toy, which no sample"):
        raw = conditions.from_batch(toy_model().cfg, batch)
    assert torch.equal(raw["toy"], torch.full((2,), float(toy_model().cfg.conditions["toy"].null)))
    del batch["caption"]
    with pytest.raises(ValueError, match="condition 'text' reads the batch field 'caption'"):
        conditions.from_batch(toy_model().cfg, batch)


def test_dca_drop_rates():
    """Text to "" with p_text, the level to 0 with p_res, independently; the rest untouched; deterministic."""
    import train

    cfg = load_config("configs/tiny.py").model
    cfg.conditions["text"].p_drop, cfg.conditions["level"].p_drop = 0.1, 0.3
    B = 20000
    raw = {"text": [f"c{i}" for i in range(B)], "level": torch.full((B,), 17.0)}
    drop = lambda c, n: conditions.drop(
        cfg, c, torch.Generator().manual_seed(0), torch.arange(n), n
    )  # noqa: E731
    out = drop(raw, B)
    dt, dr = torch.tensor([c == "" for c in out["text"]]), out["level"] == 0
    assert abs(dt.float().mean().item() - 0.1) < 0.01  # sd 0.0021
    assert abs(dr.float().mean().item() - 0.3) < 0.015  # sd 0.0032
    assert abs((dt & dr).float().mean().item() - 0.03) < 0.006  # independent; sd 0.0012
    assert torch.all(out["level"][~dr] == 17.0) and all(
        c == o for c, o, d in zip(out["text"], raw["text"], dt) if not d
    )
    again = drop(raw, B)
    assert again["text"] == out["text"] and torch.equal(again["level"], out["level"])
    few = {"text": raw["text"][:5], "level": raw["level"][:5]}
    cfg.conditions["text"].p_drop, cfg.conditions["level"].p_drop = 0.0, 0.0
    assert drop(few, 5)["text"] == few["text"]
    cfg.conditions["text"].p_drop, cfg.conditions["level"].p_drop = 1.0, 1.0
    assert torch.all(drop(few, 5)["level"] == 0) and drop(few, 5)["text"] == [""] * 5
    with pytest.raises(ValueError, match="p_drop must lie in"):
        train.parse_config(["--config", "configs/tiny.py", "--model.conditions.text.p_drop=1.5"])
    with pytest.raises(ValueError, match="batch"):
        drop({"text": raw["text"], "level": raw["level"][:3]}, B)
