"""What a decoder of model output into chunks shares, for decoders outside
this package (the framework adapters in ``turnline.agent.adapters``): open
text/reasoning parts, a step's result and its ``finish-step`` chunks, tool
input parsing, usage names, and the readers of turnline messages used by the
history converters. (The implementations live in this package's private
modules; this module is their public face.)"""

from ._base import (
    Parts, StepResult, ToolCall, finish_chunks, parse_tool_input, tool_input_done, usage_of,
)
from ._history import (
    ToolResult, data_url, is_image, output_text, role_and_parts, steps, text_of, tool_result, user_content,
)

__all__ = [
    "Parts", "StepResult", "ToolCall", "ToolResult", "data_url", "finish_chunks", "is_image", "output_text",
    "parse_tool_input", "role_and_parts", "steps", "text_of", "tool_input_done", "tool_result", "usage_of",
    "user_content",
]
