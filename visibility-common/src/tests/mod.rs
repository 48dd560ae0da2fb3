//! Host unit tests of the parser and the verdict logic.
mod parse;
mod verdict;
