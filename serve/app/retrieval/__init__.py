"""/v1/retrieve, /v1/embeddings, /v1/experts: protocol (request/response models), service
(RetrievalService: validation, batching, fan-out, merge; client protocols), router (endpoints)."""
