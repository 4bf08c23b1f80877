"""Infrastructure: settings and dataset specs, the artifact store, the Dask cluster factory."""
