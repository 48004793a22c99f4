"""Wire and resource models: the CRD models (CRD YAML is generated from them) and the lifecycle/execd schemas."""
