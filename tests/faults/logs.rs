//! Under a fault the logs stay readable and true: repeated warnings are
//! summarised, a cut upstream body is logged as cut.
