"""The online Serve application: what a replica runs, and nothing offline.

builders (the Serve ``import_path``) > deployments (thin Serve wrappers) > ingress (the FastAPI
app) > retrieval | chat (protocol, service, router each) > batching | errors | metrics | settings.
Never imports serve.offline, serve.deploy, serve.cli or the training code (import-linter)."""
