"""LLM provider adapters: a provider's streaming HTTP response as turnline chunks.

``openai_chat``, ``openai_responses`` and ``anthropic_messages`` each return a
:class:`ProviderStream`, an async iterator of AI SDK UI message stream chunks
(``start-step``, text and reasoning parts, tool calls with incremental input,
``finish-step``, usage as message metadata). Hand it to ``turn.stream_response``
(or return it from the handler): a cancel closes the HTTP response at once.
Provider failures end the turn with ``error`` and a ``provider_*`` code
(:class:`ProviderErrorCode`). See docs/providers.md.
"""

from ._base import ProviderError, ProviderErrorCode, ProviderStream, StepResult, ToolCall, shared_client
from .anthropic import anthropic_messages, anthropic_tool_result, to_anthropic
from .openai_chat import openai_chat, openai_chat_tool_result, to_openai_chat
from .openai_responses import openai_responses, openai_responses_tool_result, to_openai_responses

__all__ = [
    "ProviderError", "ProviderErrorCode", "ProviderStream", "StepResult", "ToolCall", "anthropic_messages",
    "anthropic_tool_result", "openai_chat", "openai_chat_tool_result", "openai_responses",
    "openai_responses_tool_result", "shared_client", "to_anthropic", "to_openai_chat", "to_openai_responses",
]
