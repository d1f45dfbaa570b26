"""/v1/chat/completions, /v1/models: protocol (OpenAI-compatible models), service (ChatService:
the Router-R1 loop's prompt, candidates, budget, responses), router (endpoints, SSE), llm_pool
(engines and tokenizers from the llm config)."""
