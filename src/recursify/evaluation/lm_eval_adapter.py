"""lm-evaluation-harness integration: recursify models as the lm-eval model type ``recursify``.

Importing this module registers ``RecursifyLM`` under the name ``recursify``. lm-eval (0.4.x) has no
plugin discovery, so its own ``lm_eval`` command only sees the model after this import; use

    recursify-lm-eval --model recursify --model_args path=runs/rrt --tasks piqa,arc_easy

(the same arguments as ``lm_eval``), or from Python ``import recursify.evaluation.lm_eval_adapter``
and then ``lm_eval.simple_evaluate(model="recursify", model_args="path=runs/rrt", ...)``.

``path`` is a recursify checkpoint or any model source (run as the original, loops=1). Other
model_args: ``batch_size`` (default 8), ``precision`` (fp32 | bf16), ``max_length`` (default: the
source's ``max_position_embeddings``) and ``max_gen_toks`` (default 256).
"""

from __future__ import annotations

from typing import Any

import lm_eval.models  # noqa: F401  lm-eval fills its registry (hf, vllm, ...) only while empty: before ours, or they vanish
import torch
from lm_eval.api.instance import Instance
from lm_eval.api.model import LM
from lm_eval.api.registry import register_model

from recursify.config import SamplingConfig
from recursify.evaluation.loglikelihood import continuation_logprobs, encode_pair, model_max_length, prefix_token_id
from recursify.evaluation.perplexity import evaluate_perplexity
from recursify.loading import load
from recursify.modeling.model import RecursiveModel
from recursify.text import precision_context, require_tokenizer


@register_model("recursify")
class RecursifyLM(LM):
    """lm-eval's LM interface over a RecursiveModel (log-likelihoods, rolling perplexity, generation)."""

    def __init__(
        self,
        path: str | None = None,
        model: RecursiveModel | None = None,
        batch_size: int | str = 8,
        precision: str = "fp32",
        max_length: int | str | None = None,
        max_gen_toks: int | str = 256,
        **_: Any,
    ) -> None:
        super().__init__()
        if (path is None) == (model is None):
            raise ValueError("give exactly one of path=<checkpoint or source> and model=<RecursiveModel>")
        self.model = model if model is not None else load(str(path))
        self.model.eval()
        self.tokenizer = require_tokenizer(self.model)
        self.batch_size = 8 if batch_size in ("auto", None) else int(batch_size)
        self.precision = precision
        self.max_length = int(max_length) if max_length else model_max_length(self.model)
        self.max_gen_toks = int(max_gen_toks)
        self.prefix_token = prefix_token_id(self.model, self.tokenizer)

    @property
    def tokenizer_name(self) -> str:
        return str(getattr(self.tokenizer, "name_or_path", "recursify")).replace("/", "__")

    def apply_chat_template(self, chat_history: list[dict[str, str]], add_generation_prompt: bool = True) -> str:
        return str(self.tokenizer.apply_chat_template(chat_history, tokenize=False, add_generation_prompt=add_generation_prompt))

    def loglikelihood(self, requests: list[Instance], disable_tqdm: bool = False) -> list[tuple[float, bool]]:
        pairs = [
            encode_pair(self.tokenizer, context, continuation, self.prefix_token) for context, continuation in (r.args for r in requests)
        ]
        return continuation_logprobs(self.model, pairs, self.max_length, self.batch_size, self.precision, progress=not disable_tqdm)

    def loglikelihood_rolling(self, requests: list[Instance], disable_tqdm: bool = False) -> list[float]:
        results = []
        for request in requests:
            ids = [self.prefix_token] + self.tokenizer(request.args[0], add_special_tokens=False)["input_ids"]
            if len(ids) < 2:
                results.append(0.0)  # log P(empty string) = 0
                continue
            tokens = torch.tensor(ids, dtype=torch.long)
            scored = evaluate_perplexity(
                self.model, tokens, ctx=self.max_length, batch_size=self.batch_size, precision=self.precision, progress=False
            )
            results.append(-scored.nll)
        return results

    def generate_until(self, requests: list[Instance], disable_tqdm: bool = False) -> list[str]:
        return [self._generate_one(context, dict(gen_kwargs)) for context, gen_kwargs in (r.args for r in requests)]

    def _generate_one(self, context: str, gen_kwargs: dict[str, Any]) -> str:
        until = gen_kwargs.pop("until", None) or []
        until = [until] if isinstance(until, str) else list(until)
        max_new = int(gen_kwargs.pop("max_gen_toks", gen_kwargs.pop("max_new_tokens", self.max_gen_toks)))
        temperature = float(gen_kwargs.get("temperature", 0.0)) if gen_kwargs.get("do_sample") else 0.0
        sampling = SamplingConfig(temperature=temperature, top_p=float(gen_kwargs.get("top_p", 1.0)), seed=gen_kwargs.get("seed"))
        ids = self.tokenizer(context, add_special_tokens=False)["input_ids"] or [self.prefix_token]
        ids = ids[-max(self.max_length - max_new, 1) :]
        eos = sorted(
            set(self.model.arch.eos_token_ids) | ({self.tokenizer.eos_token_id} if self.tokenizer.eos_token_id is not None else set())
        )
        generated: list[int] = []
        text = ""
        with precision_context(self.precision, self.model.device):
            for step in self.model.stream(torch.tensor([ids]), max_new_tokens=max_new, sampling=sampling, eos_token_ids=eos):
                token = int(step[0])
                if token in eos:
                    break
                generated.append(token)
                text = self.tokenizer.decode(generated, skip_special_tokens=True)
                if any(stop in text for stop in until):
                    break
        cut = min((text.index(stop) for stop in until if stop in text), default=len(text))
        return text[:cut]


def main() -> None:
    """``recursify-lm-eval``: lm-eval's own command line with the ``recursify`` model registered."""
    from lm_eval.__main__ import cli_evaluate

    cli_evaluate()
