//! The orchestrator: Raft managers that hold intent and push each node its share. Not built yet (issue 7); netd reads intent from a file meanwhile.
