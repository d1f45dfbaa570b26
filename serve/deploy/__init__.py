"""Running the app elsewhere: the Serve YAML (serve_config), the KubeRay render (k8s) and its
validation (k8s_validate), starting or joining a Ray cluster (cluster)."""
