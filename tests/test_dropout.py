"""train.dropout: residual dropout on each decoder layer's attention and MLP output while training,
as forward hooks, so the model, its state dict and its export stay stock LLaMA and evaluation
never drops."""

from __future__ import annotations

import pytest
import torch

from trainer.config import ConfigError, load_config
from trainer.config.schema import Shape
from trainer.model.llama import build_model, llama_config
from trainer.training.parallelize import residual_dropout

SHAPE = Shape(n_layer=2, d_model=32, n_head=4, n_kv_head=4, d_ffn=64)


def tiny(seed: int = 0):
    torch.manual_seed(seed)
    return build_model(llama_config(SHAPE, 100, 16), "eager")


def loss(model, ids) -> torch.Tensor:
    return model(input_ids=ids, labels=ids).loss


def test_training_drops_and_evaluation_is_the_plain_model():
    ids = torch.randint(0, 100, (2, 16), generator=torch.Generator().manual_seed(1))
    plain, dropped = tiny(), tiny()
    assert residual_dropout(dropped, 0.3) == 2 * SHAPE.n_layer
    plain.eval(), dropped.eval()
    assert torch.equal(loss(plain, ids), loss(dropped, ids))  # eval: no dropout, same bits
    dropped.train()
    torch.manual_seed(5)
    first = loss(dropped, ids)
    torch.manual_seed(6)
    second = loss(dropped, ids)
    assert not torch.equal(first, second)  # another dropout mask, another loss
    plain.train()
    assert not torch.equal(first, loss(plain, ids))
    first.backward()  # gradients flow through the dropped outputs
    assert all(p.grad is not None for p in dropped.model.layers.parameters())


def test_the_state_dict_and_module_tree_stay_stock():
    plain, dropped = tiny(), tiny()
    residual_dropout(dropped, 0.1)
    assert list(plain.state_dict()) == list(dropped.state_dict())
    assert [n for n, _ in plain.named_modules()] == [n for n, _ in dropped.named_modules()]
    assert dropped.config.to_dict() == plain.config.to_dict()  # the export's config.json: no dropout key changed


def test_a_dropout_of_one_keeps_nothing_of_the_blocks_in_training():
    """p = 1 zeroes every attention and MLP output: the blocks then leave the residual stream as it
    was, so the logits are those of a model with no decoder layers (embeddings, final norm, head)."""
    model = tiny()
    residual_dropout(model, 1.0)
    model.train()
    ids = torch.randint(0, 100, (1, 16), generator=torch.Generator().manual_seed(2))
    hidden = model.model.norm(model.model.embed_tokens(ids))
    assert torch.allclose(model(input_ids=ids).logits, model.lm_head(hidden), atol=1e-6)


@pytest.mark.parametrize("value", [-0.1, 1.0, 1.5])
def test_a_dropout_outside_zero_to_one_names_its_key(value):
    with pytest.raises(ConfigError, match=r"train\.dropout: must be in \[0, 1\)"):
        load_config(None, {"train.dropout": value}, env={})


def test_zero_and_a_fraction_are_accepted():
    assert load_config(None, {"train.dropout": 0.1}, env={}).train.dropout == 0.1
    assert load_config(None, {}, env={}).train.dropout == 0.0
