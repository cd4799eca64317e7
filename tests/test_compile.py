"""``train.compile``: the Transformer blocks compile as whole graphs (no graph break), so the
compiled path on a GPU runs the step's dense work fused; checked on CPU with dynamo's
explain, which traces without generating code."""

from __future__ import annotations

import torch

from models.encoder import Encoder
from models.encoder_config import EncoderConfig
from models.layers import Block


def _cfg() -> EncoderConfig:
    return EncoderConfig(d_model=32, n_layers=2, n_heads=2, dropout=0.2, mlp="swiglu", num_item_rows=50, id_rows=50)


def test_a_block_traces_without_graph_breaks_once_its_dropout_is_torchs():
    import torch._dynamo

    block = Block(_cfg()).train()
    x = torch.randn(3, 7, 32)
    torch._dynamo.reset()
    before = torch._dynamo.explain(block)(x)
    assert before.graph_break_count >= 1  # the project's int16 dropout mask cannot be traced
    block.drop = torch.nn.Dropout(block.drop.p)
    torch._dynamo.reset()
    after = torch._dynamo.explain(block)(x)
    assert (after.graph_count, after.graph_break_count) == (1, 0)


def test_compile_blocks_keeps_the_weights_and_the_eval_output():
    torch.manual_seed(0)
    model = Encoder(_cfg())
    keys = set(model.state_dict())
    blocks = [b.forward for b in model.blocks]
    x = torch.randn(2, 5, 32)
    model.eval()
    expected = [b(x) for b in model.blocks]
    model.compile_blocks(backend="eager")  # the compiled call without code generation (CI has no GPU)
    assert set(model.state_dict()) == keys
    assert all(isinstance(b.drop, torch.nn.Dropout) for b in model.blocks)
    for block, want, forward in zip(model.blocks, expected, blocks, strict=True):
        assert block._compiled_call_impl is not None and block.forward == forward
        torch.testing.assert_close(block(x), want)
