"""What one setting's evaluation cost, counted by the ``visionzip`` model itself and summed over the ranks.

Per request: its prompt tokens (the whole sequence the LLM reads, vision placeholders included) and its vision
tokens; per batch the model runs: the time to first token of ``generate`` (:func:`~visionzip_tune.inference.
stage_timer.first_token`: CUDA events on a GPU), which every request of the batch waited; and the wall time spent
answering requests (building inputs, looking answers up, running the model). Requests served from the answer store
count in the token means but not in the speed: ``requests_per_s`` is the requests the model answered in this run
over the slowest rank's answering time.
"""

from __future__ import annotations

from dataclasses import dataclass, fields

from visionzip_tune.distributed import all_reduce_max, all_reduce_sum


@dataclass
class Throughput:
    requests: int = 0  # answered, from the model or the store
    computed: int = 0  # answered by the model in this run
    prompt_tokens: int = 0
    vision_tokens: int = 0
    first_token_ms: float = 0.0  # summed over the generate requests the model answered
    timed_requests: int = 0  # generate requests with a time to first token
    seconds: float = 0.0  # answering requests
    batch_size: int = 0  # the largest batch the model ran

    def count(self, prompt_tokens: list[int], vision_tokens: list[int], computed: int) -> None:
        self.requests += len(prompt_tokens)
        self.computed += computed
        self.prompt_tokens += sum(prompt_tokens)
        self.vision_tokens += sum(vision_tokens)

    def first_token(self, ms: float | None, requests: int) -> None:
        if ms is not None:
            self.first_token_ms += ms * requests
            self.timed_requests += requests

    def reduced(self) -> Throughput:
        """The totals over every rank (a collective: call on all ranks): sums, and the slowest rank's seconds and
        the largest batch."""
        summed = [f.name for f in fields(self) if f.name not in ("seconds", "batch_size")]
        totals = all_reduce_sum([float(getattr(self, name)) for name in summed])
        seconds, batch_size = all_reduce_max([self.seconds, float(self.batch_size)])
        values = {name: int(v) if name != "first_token_ms" else v for name, v in zip(summed, totals)}
        return Throughput(**values, seconds=seconds, batch_size=int(batch_size))

    def summary(self) -> dict[str, float | int | None]:
        """The figures results.json and the table report (None where nothing was measured)."""
        return {
            "requests": self.requests,
            "computed": self.computed,
            "from_store": self.requests - self.computed,
            "seconds": round(self.seconds, 3),
            "requests_per_s": self.computed / self.seconds if self.computed and self.seconds > 0 else None,
            "prompt_tokens": self.prompt_tokens / self.requests if self.requests else None,
            "vision_tokens": self.vision_tokens / self.requests if self.requests else None,
            "ttft_ms": self.first_token_ms / self.timed_requests if self.timed_requests else None,
            "batch_size": self.batch_size,
        }
