//! Merges: which parts to merge (`policy`, pure), publishing the choice to the log
//! (`assign`), and running a merge locally (`local`).

pub mod assign;
pub mod local;
pub mod policy;
