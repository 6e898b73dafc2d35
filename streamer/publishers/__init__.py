"""Where events go: MQTT (with Home Assistant discovery) and the console."""
