//! Working-set traces: the pages a restored VM touched, in fault order.
