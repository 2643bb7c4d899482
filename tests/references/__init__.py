"""Paper-literal float64 references, one class per algorithm, written from the papers (not from
the library). Each keeps its state in ``self.state`` under the library's key names."""
