"""Teacher backends: each turns a `TeacherRequest` into a `TeacherResult`."""
