"""The private training engine (the loop in alignkit.engine.loop): nothing here is public API; plugins never
import it."""
