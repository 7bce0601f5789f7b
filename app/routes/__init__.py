"""One router per resource: generate, retrieve, experts, health (health, readiness, metrics), ui (the page at /)."""
