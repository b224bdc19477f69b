"""What an HTTP request gets before any upgrade: admission (health, metrics, refusals by
role, origin and limit) and the origin patterns browsers are checked against."""
