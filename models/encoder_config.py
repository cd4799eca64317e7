"""``EncoderConfig``: every number the encoder needs, data shapes included, so that a checkpoint
rebuilds the model from its own config (no YAML needed).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, fields
from typing import Any

GAP_BUCKETS = 32  # log2 buckets of the gap to the previous event, in seconds
HOUR_ROWS, WEEKDAY_ROWS = 24, 7


@dataclass
class EncoderConfig:
    # --- data shapes: filled from the prepared arrays (EncoderConfig.from_meta) ----------------
    num_item_rows: int = 2  # size of the item row space (0 = padding)
    id_rows: int = 2  # rows 1 .. id_rows - 1 have an id embedding; later rows are cold
    item_vocab: tuple[int, ...] = ()  # vocabulary of each sparse item feature
    user_vocab: tuple[int, ...] = ()  # sparse user features, then multi-valued ones
    num_user_sparse: int = 0  # how many of user_vocab are sparse (the rest are multi-valued)
    multi_len: int = 8
    mm_dims: tuple[int, ...] = ()  # dim of each multi-modal family
    sid_vocab: tuple[int, ...] = ()  # per Semantic ID level: codes + 1 (0 = none)
    n_actions: int = 2
    max_len: int = 100
    time_origin: int = 0  # seconds; data times are relative to it
    # --- architecture ---------------------------------------------------------------------------
    d_model: int = 64  # width of every embedding and of the Transformer
    n_layers: int = 2  # Transformer blocks (pre-norm, causal)
    n_heads: int = 2  # attention heads per block
    mlp_ratio: float = 2.0  # hidden width of a block's MLP over d_model
    mlp: str = "swiglu"  # relu | gelu | swiglu
    norm: str = "layernorm"  # layernorm | rmsnorm
    dropout: float = 0.1  # on embeddings and residual branches (a preset that leaves it out: auto)
    attn_dropout: float = 0.0  # on attention weights (forces SDPA's slower math path on CPU)
    id_buckets: int = 0  # 0: one id row per item; n: ids hashed into n rows (huge vocabularies)
    id_init_std: float = 0.0  # initial spread of the id embeddings (0: zeros)
    feature_buckets: int = 1_000_000  # a feature with a larger vocabulary is hashed into this many rows
    # Embedding tables with more rows get sparse gradients and row-wise SparseAdam updates. Below
    # it a dense gradient is cheaper than coalescing a sparse one of batch x features rows.
    sparse_threshold: int = 100_000
    use_ids: bool = True  # an item's id embedding in its token
    use_item_features: bool = True  # its sparse features
    use_mm: bool = True  # its multi-modal embeddings, projected
    use_sids: bool = True  # its Semantic ID codes
    use_user_features: bool = True  # a user token of the user's features
    use_time: bool = True  # time features of each event (hour, weekday, gap to the previous, absolute time)
    use_actions: bool = True  # each event's action type
    n_fourier: int = 8  # Fourier frequencies of absolute time (periods from 1 hour to 1 year)
    action_conditioning: bool = True  # FiLM of the output by the action asked for
    # Also tell every token, inside the Transformer, which action its next item is asked for
    # (training: the target's own action; retrieval: the action asked for).
    next_action_input: bool = False
    out_proj: bool = True  # a linear map from the backbone to the query space
    # Encoders of this architecture, each trained on its own with seed + i, scored as one: a
    # user's and an item's vectors join theirs (models/encoder_ensemble.py). A preset that
    # leaves it out: auto (models/auto_settings.py choose_members).
    members: int = 1
    # --- objective --------------------------------------------------------------------------------
    # softmax: over every item row (catalogues that fit); infonce: sampled negatives with logQ
    # correction (huge catalogues); bce: the official baseline's one negative per position.
    loss: str = "infonce"  # a preset that leaves it out: auto (models/auto_settings.py choose_loss)
    # softmax: leave each position's own history items out of its softmax, the way ranking
    # excludes them (the report's history filter), instead of pushing them down.
    loss_excludes_history: bool = False  # a preset that leaves it out: auto (the report's history filter)
    similarity: str = "cosine"  # cosine | dot (used by the loss and by retrieval)
    temperature: float = 0.1  # logits = similarity / temperature
    learn_temperature: bool = False  # learn it instead (from the value above)

    @classmethod
    def from_meta(cls, meta: dict[str, Any], **arch: Any) -> EncoderConfig:
        known = {f.name for f in fields(cls)}
        unknown = set(arch) - known
        if unknown:
            raise ValueError(f"unknown model settings {sorted(unknown)}; known: {sorted(known)}")
        shapes = dict(
            num_item_rows=meta["num_item_rows"],
            id_rows=meta["id_rows"],
            item_vocab=tuple(meta["item_vocab"]),
            user_vocab=tuple(meta["user_vocab"][k] for k in meta["user_sparse"] + meta["user_multi"]),
            num_user_sparse=len(meta["user_sparse"]),
            multi_len=meta["multi_len"],
            mm_dims=tuple(meta["mm_dims"]),
            sid_vocab=tuple(meta["sid_vocab"]),
            n_actions=meta["n_actions"],
            max_len=meta["max_len"],
            time_origin=meta["time_origin"],
        )
        return cls(**{**shapes, **arch})  # arch may override a shape (e.g. a larger id table)

    @property
    def vector_dim(self) -> int:
        """Width of the retrieval vectors: the members' widths joined."""
        return self.d_model * self.members

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> EncoderConfig:
        data = dict(data)
        for f in fields(cls):
            if f.name in data and isinstance(data[f.name], list):
                data[f.name] = tuple(data[f.name])
        return cls(**data)
