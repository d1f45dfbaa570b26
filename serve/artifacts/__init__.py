"""What is on disk, as both the online app and the offline pipelines read it: the expert store
(adapters, pilots and their rule, names), the index location, model and LLM resolution, and the
atomic folder swap every writer uses (atomic). Never trains or encodes."""
