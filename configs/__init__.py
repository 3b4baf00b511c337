"""Ready plans (YAML) shipped with nextn."""
