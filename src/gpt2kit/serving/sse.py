"""Server-sent events: `data: {json}\\n\\n` per chunk, then `data: [DONE]\\n\\n` (OpenAI's stream format).

An error after the stream has begun cannot change the status any more; it is sent as one
`data: {"error": ...}` event before [DONE], as vLLM does.
"""
from __future__ import annotations

import json
import logging

from starlette.responses import StreamingResponse

from .protocol import APIError

log = logging.getLogger("gpt2kit.serve")


def _event(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


def sse_response(chunks, submission) -> StreamingResponse:
    async def body():
        try:
            async for chunk in chunks:
                yield _event(chunk)
        except APIError as e:
            yield _event(e.body())
        except Exception:
            log.exception("a stream failed")
            yield _event(APIError("The server failed while streaming this response; it has been logged.",
                                  status=500).body())
        finally:
            submission.abort()  # a no-op when finished; frees the slots when the client went away
        yield "data: [DONE]\n\n"

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
