"""loraplex on Ray Serve: one FastAPI ingress (no model), many engine replicas, one shared adapter store.

`server.ray.app` builds the Serve application (`loraplex serve --replicas N`, `serve run server.ray.app:build`);
`ingress` is the HTTP deployment, `replica` the engine deployment, `routing` the ingress's client of the replicas,
`store` the shared adapter store and catalog, `jobs` training jobs as Ray tasks. Only `config` is importable
without ray.
"""
