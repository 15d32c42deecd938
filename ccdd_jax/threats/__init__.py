"""What a pirate tries: removal attacks on models, attacks on the data, detection."""
