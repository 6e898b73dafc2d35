"""Where events and live state go: MQTT (with Home Assistant discovery), the console, clips, metrics, the web page."""
