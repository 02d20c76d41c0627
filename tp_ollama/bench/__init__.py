"""`tp-ollama bench`: measuring the engine, servers, collectives and links, and a cost model that predicts TP speed."""
