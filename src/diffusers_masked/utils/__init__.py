"""Small helpers the rest of the package builds on: the one atomic write (`io`) and the one way to read a file this
package did not just write (`safe_loading`)."""
