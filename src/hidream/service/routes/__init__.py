"""The HTTP routes, one router per concept; `hidream.service.app.create_app` assembles them."""
