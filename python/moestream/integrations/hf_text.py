"""Text in and out for the run command (``python -m moestream run``): the checkpoint's tokenizer
and a streamer that writes the generated text as it comes and records when each token came."""

from __future__ import annotations

import time

from transformers import AutoTokenizer, TextStreamer


def load_tokenizer(path: str):
    return AutoTokenizer.from_pretrained(path)


def timed_streamer(tokenizer, out, enabled: bool):
    """A transformers TextStreamer writing to ``out`` that also records when each new token came."""

    class _TimedStreamer(TextStreamer):
        def __init__(self):
            super().__init__(tokenizer, skip_prompt=True, skip_special_tokens=True)
            self.token_times: list[float] = []
            self._prompt_seen = False

        def put(self, value):
            if not self._prompt_seen:  # generate() first puts the prompt
                self._prompt_seen = True
            else:
                self.token_times.append(time.perf_counter())
            if enabled:
                super().put(value)

        def end(self):
            if enabled:
                super().end()

        def on_finalized_text(self, text: str, stream_end: bool = False):
            out.write(text + ("\n" if stream_end else ""))
            out.flush()

    return _TimedStreamer()
