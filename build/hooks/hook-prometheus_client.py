"""prometheus-client: the exposition formats, not the Twisted or Graphite bridges."""

hiddenimports = ["prometheus_client.exposition", "prometheus_client.openmetrics.exposition"]
excludedimports = ["prometheus_client.twisted", "prometheus_client.bridge"]
