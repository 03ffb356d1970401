"""`gptlab serve`: an OpenAI-compatible server. `engine` (continuous batching, no HTTP), `protocol` (request
bodies, JSON shapes), `app` (the routes), `server` (loading a model and running it), `cli`."""
